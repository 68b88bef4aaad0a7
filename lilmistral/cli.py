"""The `lilmistral` command. The one place that turns user errors into a line and an exit code."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import LilmistralError


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
    llm = load(ns.model, device=ns.device, num_ctx=ns.num_ctx, dtype=ns.dtype)
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    messages.append({"role": "user", "content": prompt.strip()})
    for piece in llm.chat(messages, **_sampling_kwargs(ns)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


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
