"""The `lilmistral` command. The one place that turns user errors into a line and an exit code."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import LilmistralError
from .quant import DEFAULT_GROUP_SIZE, SCHEMES
from .quant.pack import GROUP_SIZES


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int)


def _sampling_kwargs(ns: argparse.Namespace) -> dict:
    names = ("temperature", "top_k", "top_p", "repeat_penalty", "seed", "max_tokens")
    return {n: getattr(ns, n) for n in names if getattr(ns, n) is not None}


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=SCHEMES, help="weights for a HF folder or .gguf (default: as stored)")
    p.add_argument("--num-ctx", type=int, help="context length for models without a sliding window")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype of float weights")
    p.add_argument("--device", default="cpu")


def cmd_run(ns: argparse.Namespace) -> int:
    from . import load

    prompt = ns.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if not prompt or not prompt.strip():
        raise LilmistralError("give a prompt: lilmistral run MODEL \"your question\" (or pipe it on standard input)")
    llm = load(ns.model, quant=ns.quant, device=ns.device, num_ctx=ns.num_ctx, dtype=ns.dtype)
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    messages.append({"role": "user", "content": prompt.strip()})
    for piece in llm.chat(messages, **_sampling_kwargs(ns)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .convert import convert, open_source, plan

    source = Path(ns.source).expanduser()
    out = Path(ns.out).expanduser() if ns.out else Path.cwd() / (ns.name or f"{source.stem}-{ns.quant}")
    planned = plan(open_source(source), ns.quant, ns.group_size)
    total = sum(p.entry.shape[0] * (p.entry.shape[1] if len(p.entry.shape) > 1 else 1) for p in planned)
    console = _stderr_console()
    with Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=console, disable=not console.is_terminal) as progress:
        tensors = progress.add_task("tensors", total=len(planned))
        progress.update(tensors, total=len(planned))
        written = {"bytes": 0}

        def on_tensor(name: str, nbytes: int) -> None:
            written["bytes"] += nbytes
            if not name.endswith((".scales", ".mins")):
                progress.advance(tensors)

        convert(source, out, ns.quant, ns.group_size, overwrite=ns.force, on_tensor=on_tensor)
    print(f"wrote {out} ({ns.quant}, {written['bytes'] / 1e6:.1f} MB from {total / 1e6:.1f}M weights)")
    return 0


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lilmistral", description="Run Mistral-family models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a prompt with a model")
    run.add_argument("model", help="a model folder")
    run.add_argument("prompt", nargs="?", help="the question (default: standard input)")
    run.add_argument("--system", help="system prompt")
    _sampling_args(run)
    _load_args(run)
    run.set_defaults(func=cmd_run)

    conv = sub.add_parser("convert", help="write a model in lilmistral's packed format")
    conv.add_argument("source", help="a Hugging Face folder or a .gguf file")
    conv.add_argument("--quant", choices=SCHEMES, default="int4")
    conv.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
                      help="int4 group size")
    where = conv.add_mutually_exclusive_group()
    where.add_argument("--out", help="output folder")
    where.add_argument("--name", help="output folder name in the current folder")
    conv.add_argument("--force", action="store_true", help="replace an existing output folder")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except LilmistralError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
