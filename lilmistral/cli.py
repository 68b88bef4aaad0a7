"""The `lilmistral` command. The one place that turns user errors into a line and an exit code."""
from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from . import __version__
from .errors import LilmistralError, for_stderr, show_warning
from .quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES

DEFAULT_PORT = 11434  # Ollama's: its clients look there (lilmistral.serve imports torch; --help does not)
JINJA_FORMAT = "the model's Jinja chat template (sandboxed)"  # show's chat format line, where not Mistral's
MISTRAL_FORMAT = "Mistral instruct, as mistral_common encodes it"


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low` (argparse says which option it was)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value
    parse.__name__ = "int"  # argparse's message for a non-number: "invalid int value"
    return parse


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, help="0 is greedy (default 0.8, or the model's own: see show)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--repeat-last-n", type=int, help="tokens the penalty looks back over (default 64; 0 off, -1 all)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int)


def _sampling_kwargs(ns: argparse.Namespace) -> dict:
    names = ("temperature", "top_k", "top_p", "repeat_penalty", "repeat_last_n", "seed", "max_tokens")
    return {n: getattr(ns, n) for n in names if getattr(ns, n) is not None}


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=SCHEMES, help="weights for a HF folder or .gguf (default: as stored)")
    p.add_argument("--num-ctx", type=int, help="context length for models without a sliding window")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype of float weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda (with --pp, stage i on GPU i)")
    p.add_argument("--pp", type=_at_least(1), default=1, help="pipeline stages, one process each")
    p.add_argument("--threads", type=_at_least(1),
                   help="CPU threads (default: one per core, as llama.cpp); with --pp, each stage's")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU); on a CPU the default step is as fast")


def _store():
    from .store import Store

    return Store()


def _byte_progress(console):
    """Progress bars of bytes (a download's, a conversion's written), on a terminal."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def _bar(progress, description: str, total: int, completed: int = 0) -> Callable[[int], None]:
    """A new bar; returns what advances it by a count of bytes."""
    task = progress.add_task(description, total=total, completed=completed)
    return lambda n: progress.advance(task, n)


def _pull(name: str, keep_source: bool = False, force: bool = False) -> Path:
    from .download import pull
    from .registry import resolve

    store = _store()
    ref = resolve(name, store.home)
    console = _stderr_console()
    console.print(f"pulling {ref.display} from {ref.repo}", highlight=False)
    with _byte_progress(console) as progress:
        path = pull(ref, store, keep_source=keep_source, force=force, say=lambda m: console.print(m, highlight=False),
                    on_file=lambda file, size, have: _bar(progress, file, size, have),
                    on_convert=(lambda scheme, total: _bar(progress, f"converting to {scheme}", total))
                    if console.is_terminal else None)
    console.print(f"{ref.display} ready", highlight=False)
    return path


def _model_path(model: str) -> str:
    """A path as given; else a registry name, pulled first when missing (as `ollama run` does)."""
    from .registry import resolve

    if Path(model).expanduser().exists():
        return model
    if model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf"):
        raise LilmistralError(f"{model}: no such model folder or file")
    store = _store()
    ref = resolve(model, store.home)
    installed = store.installed(ref)
    return str(installed.path if installed else _pull(model))


def cmd_pull(ns: argparse.Namespace) -> int:
    _pull(ns.model, keep_source=ns.keep_source, force=ns.force)
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    from .store import human_age, human_size

    rows = [(f"{m.name}:{m.tag}", m.quant, human_size(m.size), human_age(m.modified)) for m in _store().list()]
    header = ("NAME", "QUANT", "SIZE", "MODIFIED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def cmd_show(ns: argparse.Namespace) -> int:
    from .convert import is_converted
    from .loader import resolve_source

    path = resolve_source(ns.model)
    lines = _converted_lines(path) if is_converted(path) else _source_lines(path)
    lines += [("sampling", _sampling_line(path)), ("size on disk", _size(path)),
              ("pipeline", _stage_split(path, ns.pp) if ns.pp > 1 else "")]
    for key, value in lines:
        if value:
            print(f"  {key:14s}{value}")
    return 0


def _sampling_line(path: Path) -> str:
    """The sampling options `run` starts with: the model's recommended ones (marked) over lilmistral's defaults."""
    from .generate import RECOMMENDABLE, SamplingParams
    from .loader import model_sampling

    recommended = model_sampling(path)
    params = SamplingParams(**recommended)
    return ", ".join(f"{name} {getattr(params, name)}" + (" (the model's)" if name in recommended else "")
                     for name in RECOMMENDABLE)


def _architecture_lines(args, num_ctx: int | None = None) -> list[tuple[str, str]]:
    from .store import human_parameters

    window = f"sliding window {args.sliding_window}" if args.sliding_window else "no sliding window"
    experts = f", {args.n_experts} experts ({args.n_experts_per_tok} per token)" if args.is_moe else ""
    return [
        ("architecture", f"{args.architecture}: {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads / "
                         f"{args.n_kv_heads} kv heads, head_dim {args.head_dim}, FFN {args.hidden_dim}{experts}"),
        ("parameters", human_parameters(args.n_parameters)),
        ("context", f"{num_ctx or args.max_seq_len} tokens, {window}"),
        ("rope", f"theta {args.rope_theta:g}" + (f", {args.rope_scaling.kind} x{args.rope_scaling.factor:g}"
                                                 if args.rope_scaling else "")),
    ]


def _chat_format(folder: Path) -> str:
    """A folder's: Mistral's instruct format where it has Mistral's tokenizer files, or a GGUF's Mistral vocabulary
    converted (its tokenizer_config.json says so); else its template."""
    from .config import read_json
    from .tokenizer import find_mistral_tokenizer_file

    config = folder / "tokenizer_config.json"
    settings = read_json(config) if config.is_file() else {}  # damaged: one line
    converted = isinstance(settings, dict) and settings.get("lilmistral_instruct_version")
    return MISTRAL_FORMAT if find_mistral_tokenizer_file(folder) or converted else JINJA_FORMAT


def _layouts(specs: Iterable[dict]) -> str:
    """How many tensors each packed layout holds (the manifest's specs): " (tensors 48 int4 g32, 9 int8)"."""
    from collections import Counter

    def layout(spec: dict) -> str:
        if spec["scheme"] not in ("int4", "int5"):
            return spec["scheme"]
        super_block = f" in super-blocks of {spec['super_block']}" if spec.get("super_block") else ""
        return f"{spec['scheme']}{'-sym' if spec['symmetric'] else ''} g{spec['group_size']}{super_block}"

    counts = Counter(layout(spec) for spec in specs).most_common()
    return f" (tensors {', '.join(f'{n} {kind}' for kind, n in counts)})" if counts else ""


def _converted_lines(path: Path) -> list[tuple[str, str]]:
    from .loader import read_manifest

    manifest, args = read_manifest(path)
    q, source = manifest["quant"], manifest.get("source", {})
    return [
        ("model", manifest.get("name", path.name) + (f":{manifest['tag']}" if manifest.get("tag") else "")),
        ("description", manifest.get("description") or ""),
        *_architecture_lines(args, manifest.get("num_ctx")),
        ("quantization", q["scheme"] + (f", group size {q['group_size']}" if q.get("group_size") else "") +
         _layouts(manifest["tensors"].values())),
        ("tokenizer", manifest.get("tokenizer", "")),
        ("chat format", _chat_format(path)),
        ("licence", manifest.get("license") or "see the source repo"),
        ("source", f"{manifest['repo']} @ {manifest.get('revision', '?')}" if manifest.get("repo")
         else f"{source.get('path', '?')} ({source.get('kind', '?')})"),
    ]


def _source_lines(path: Path) -> list[tuple[str, str]]:
    """A Hugging Face folder or a .gguf, described from its metadata (which is printed made printable: a file's
    strings could carry terminal escape sequences)."""
    from collections import Counter

    from .convert import default_scheme, open_source, tokenizer_files
    from .convert.gguf import GGUFSource, ggml, mistral_instruct_version

    src = open_source(path)
    counts = Counter(e.source_type for e in src.entries).most_common()
    stored = "tensors " + ", ".join(f"{n} {kind}" for kind, n in counts)
    if not isinstance(src, GGUFSource):
        return [("model", path.name), *_architecture_lines(src.args),
                ("quantization", f"{stored}; runs as stored, or quantized as it loads with --quant"),
                ("tokenizer", ", ".join(p.name for p in tokenizer_files(path))), ("chat format", _chat_format(path)),
                ("source", f"{path.resolve()} (huggingface)")]

    def general(key: str, default: str = "") -> str:  # descriptive: one of the wrong type is shown as missing
        value = src.metadata.get(f"general.{key}")
        return _printable(value if isinstance(value, str) else default)

    file_type = src.metadata.get("general.file_type")
    if isinstance(file_type, int) and file_type in ggml().LlamaFileType._value2member_map_:
        stored = f"{ggml().LlamaFileType(file_type).name.removeprefix('MOSTLY_')} ({stored})"
    template = src.meta("tokenizer.chat_template", str)
    split = f", split in {len(src.parts)} files" if len(src.parts) > 1 else ""
    return [
        ("model", general("name", path.stem)),
        *_architecture_lines(src.args),
        ("quantization", f"{stored}; runs as {default_scheme(src)} (convert it once: lilmistral convert)"),
        ("tokenizer", f"gguf {_printable(src.meta('tokenizer.ggml.model', str, '?'))}, "
                      f"{len(src.meta('tokenizer.ggml.tokens', list, []))} tokens"),
        ("chat format", MISTRAL_FORMAT if mistral_instruct_version(src) else JINJA_FORMAT if template
         else "none in the file"),
        ("licence", general("license")),
        ("source", f"{src.path.resolve()} (gguf{split})"),
    ]


def _printable(text: str, limit: int = 200) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _stage_split(path: Path, pp: int) -> str:
    from .loader import model_args, tensor_bytes
    from .parallel import plan_stages, stage_bytes

    sizes = tensor_bytes(path)
    ranges = plan_stages(sizes, model_args(path).n_layers, pp)
    per_stage = stage_bytes(sizes, ranges, model_args(path).tie_embeddings)
    return "; ".join(f"stage {i}: layers {a}-{b - 1} ({n / 1e6:.1f} MB)" for i, ((a, b), n) in
                     enumerate(zip(ranges, per_stage)))


def _size(path: Path) -> str:
    from .convert.gguf import gguf_parts
    from .store import folder_size, human_size

    return human_size(sum(folder_size(p) for p in (gguf_parts(path) if path.suffix == ".gguf" else [path])))


def cmd_rm(ns: argparse.Namespace) -> int:
    from .registry import resolve
    from .store import human_size

    store = _store()
    for name in ns.models:
        ref = resolve(name, store.home)
        print(f"deleted {ref.display} ({human_size(store.remove(ref))} freed)")
    return 0


def _set_threads(ns: argparse.Namespace) -> None:
    """--threads, for this process and the pipeline stages it starts (their PyTorch reads OMP_NUM_THREADS)."""
    if ns.threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(ns.threads)
        torch.set_num_threads(ns.threads)


def _exit_on_hangup() -> None:
    """End the process on SIGHUP (its terminal closed) and SIGTERM (a shutdown) by raising SystemExit(128 + the
    signal) where it stands, so that the chat's finally blocks run: an answer cut short so is saved."""
    import signal

    def leave(received: int, frame) -> None:
        for number in (signal.SIGHUP, signal.SIGTERM):  # a second one (a process group's, `timeout`'s) would
            signal.signal(number, signal.SIG_IGN)  # interrupt the first one's exit
        sys.exit(128 + received)

    for number in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(number, leave)


def _piped_input() -> str:
    """Standard input's text where it is a pipe or a file (`cat notes.txt | lilmistral run ...`); "" where it is
    /dev/null, a terminal or a socket, which are not read."""
    mode = os.fstat(0).st_mode
    return sys.stdin.read() if stat.S_ISFIFO(mode) or stat.S_ISREG(mode) else ""


def cmd_run(ns: argparse.Namespace) -> int:
    _set_threads(ns)
    _exit_on_hangup()
    prompt, interactive = ns.prompt, ns.prompt is None and sys.stdin.isatty()
    if not sys.stdin.isatty():  # piped text comes first, the prompt's words after it (as Ollama's)
        prompt = "\n\n".join(text.rstrip() for text in (_piped_input(), ns.prompt) if text and text.strip())
        if not prompt:
            raise LilmistralError("standard input is empty: give a prompt")
    if _torchrun_worker(ns):
        return 0
    path = _model_path(ns.model)
    err = _stderr_console()
    llm = _load(ns, path, chat=True)
    try:
        return _run(ns, llm, prompt, interactive, err)
    finally:
        llm.close()


def _load(ns: argparse.Namespace, path: str, chat: bool = False):
    from . import load

    from .quant import vnni

    err = _stderr_console()
    with err.status("loading model...") as status:  # one spinner line, its words following the steps
        if ns.device == "cpu" and vnni.cpu_isas():
            status.update("preparing the CPU kernels (built once, under a minute)")
            vnni.available()
            status.update("loading model...")
        llm = load(path, quant=ns.quant, device=ns.device, num_ctx=ns.num_ctx, dtype=ns.dtype, pp=ns.pp,
                   compile=ns.compile, require_chat=chat)
        if err.is_terminal and path.endswith(".gguf") and llm.load_s > 5:  # converted in memory, every run
            err.print(f"converting {Path(path).name} took {llm.load_s:.0f} s: `lilmistral convert {path} --name "
                      "NAME` once, then `lilmistral run NAME` loads it without converting", style="dim", markup=False,
                      highlight=False)
        # the first tokens pay one-off costs (the decode step's compile or trace, GPU kernels' builds): now, not
        # mid-answer
        status.update("compiling the decode step (about a minute the first time, cached after)" if ns.compile
                      else "warming up")
        llm.warm_up()
    return llm


def _torchrun_worker(ns: argparse.Namespace) -> bool:
    """Under torchrun, ranks > 0 serve their pipeline stage and return True."""
    if ns.pp <= 1 or int(os.environ.get("RANK", "0")) == 0:
        return False
    from .loader import resolve_source
    from .parallel import serve_torchrun_worker
    from .quant import DEFAULT_GROUP_SIZE

    serve_torchrun_worker(resolve_source(ns.model), ns.pp, quant=ns.quant, device=ns.device, num_ctx=ns.num_ctx,
                          dtype=ns.dtype, group_size=DEFAULT_GROUP_SIZE)
    return True


def _run(ns: argparse.Namespace, llm, prompt: str | None, interactive: bool, err) -> int:
    from rich.console import Console

    from .repl import AutoSave, Chat, recap, repl, say, stats_text, stream_answer

    if ns.verbose and llm.info.get("stages"):
        err.print("pipeline stages: " + "; ".join(f"{s} ({b / 1e6:.1f} MB)" for s, b in
                                                  zip(llm.info["stages"], llm.info["stage_bytes"])), highlight=False)
    chat, saves = Chat(llm), AutoSave(_store().conversations_dir, ns.model)
    if ns.resume and saves.resume(chat) is None:
        raise LilmistralError(f"no saved conversation with {ns.model} to resume (in {saves.folder})")
    if (interactive or ns.resume) and not ns.no_save:  # a one-shot answer is not a conversation to keep
        chat.autosave = saves
    if ns.system is not None:
        chat.system = ns.system or None
    for key, value in _sampling_kwargs(ns).items():
        chat.set(key, str(value))
    console = Console()
    if interactive:
        if ns.resume:
            say(console, recap(chat, saves.path), "dim")
        chat.verbose, chat.wrap = ns.verbose, not ns.nowordwrap
        repl(chat, console, _store().history_file, markdown=ns.markdown)
        return 0
    start = time.perf_counter()
    if ns.format == "json":
        answer = "".join(chat.ask(prompt.strip()))
        s = llm.stats
        print(json.dumps({"model": ns.model, "response": answer, "prompt_tokens": s.prompt_tokens,
                          "eval_tokens": s.eval_tokens, "load_s": round(llm.load_s, 4),
                          "prompt_eval_s": round(s.prefill_s, 4), "eval_s": round(s.eval_s, 4),
                          "total_s": round(llm.load_s + time.perf_counter() - start, 4),  # as Ollama's
                          "done_reason": s.done_reason},
                         ensure_ascii=False))
        return 0
    stream_answer(chat, prompt.strip(), console, ns.markdown, verbose=False, notices=err, wrap=not ns.nowordwrap)
    if ns.verbose:
        err.print(stats_text(llm, llm.load_s + time.perf_counter() - start, load_s=llm.load_s), markup=False,
                  highlight=False)
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from .bench import bench

    _set_threads(ns)
    if _torchrun_worker(ns):
        return 0
    llm = _load(ns, _model_path(ns.model))
    try:
        result = bench(llm, ns.prompt_tokens, ns.gen_tokens).to_dict()
    finally:
        llm.close()
    if llm.info.get("stages"):
        result["stages"] = llm.info["stages"]
    if not ns.json:
        how = [f"{result['gen_tokens']} tokens", f"{result['decode_step']} step"]
        if result["cpu_kernels"]:
            how.append(f"{result['cpu_kernels']} kernels on {result['threads']} thread" + "s" * (result["threads"] > 1))
        if result["huge_page_fraction"] is not None:
            how.append(f"{100 * result['huge_page_fraction']:.0f}% of their weights in 2 MB pages")
        rows = [("prefill", f"{result['prefill_tps']:.1f} tokens/s ({ns.prompt_tokens} tokens)"),
                ("decode", f"{result['decode_tps']:.1f} tokens/s ({', '.join(how)})"),
                ("time to first token", f"{result['ttft_s'] * 1e3:.1f} ms"),
                ("load", f"{result['load_s']:.2f} s"),
                ("peak memory", f"{result['peak_rss_mb']:.0f} MB"),
                ("weights read per token", f"{result['weight_bytes_per_token'] / 1e6:.1f} MB"),
                ("achieved", f"{result['achieved_gbps']:.1f} GB/s of {result['bandwidth_gbps']:.1f} GB/s measured "
                             f"({100 * result['bandwidth_fraction']:.0f}%)")]
        for key, value in rows:
            print(f"  {key:24s}{value}")
    print(json.dumps(result))
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    import threading

    from .serve import Models, make_server

    _set_threads(ns)
    _exit_on_hangup()

    def load_model(path: str):
        print(f"loading {path}", file=sys.stderr, flush=True)
        return _load(ns, path, chat=True)

    preloaded = None
    if ns.model:
        path = _model_path(ns.model)
        preloaded = (ns.model.removesuffix(":latest"), path, _load(ns, path, chat=True))
    models = Models(load_model, preloaded)
    server = make_server(ns.host, ns.port, models)
    host, port = server.server_address[:2]
    print(f"lilmistral serve: listening on http://{host}:{port} (Ollama's API: /api/chat, /api/generate, /api/tags; "
          "OpenAI's: /v1/chat/completions, /v1/completions, /v1/models); Ctrl-C stops it", file=sys.stderr,
          flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        models.work()  # the model's work on this thread, which loaded it (see serve.Models)
    except KeyboardInterrupt:
        return 0
    finally:
        server.shutdown()
        server.server_close()
        models.close()


def cmd_convert(ns: argparse.Namespace) -> int:
    from .convert import convert, default_scheme, open_source, plan
    from .convert.gguf import SPLIT_NAME, GGUFSource

    source = Path(ns.source).expanduser()
    src = open_source(source)
    quant = ns.quant or (default_scheme(src) if isinstance(src, GGUFSource) else "int4")  # a GGUF: as `run` runs it
    stem = Path(SPLIT_NAME.sub(".gguf", source.name)).stem  # a split GGUF's, without the part's number
    out = Path(ns.out).expanduser() if ns.out else Path.cwd() / (ns.name or f"{stem}-{quant}")
    planned = plan(src, quant, ns.group_size)
    total = sum(p.entry.shape[0] * (p.entry.shape[1] if len(p.entry.shape) > 1 else 1) for p in planned)
    written = []  # the bytes convert writes, as it tells on_write

    with _byte_progress(_stderr_console()) as progress:
        def on_write(nbytes: int) -> Callable[[int], None]:
            written.append(nbytes)
            return _bar(progress, "converting", nbytes)

        convert(source, out, quant, ns.group_size, overwrite=ns.force, on_write=on_write)
    print(f"wrote {out} ({quant}, {written[0] / 1e6:.1f} MB from {total / 1e6:.1f}M weights)")
    return 0


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lilmistral", description="Run Mistral-family models locally.")
    parser.add_argument("-v", "--version", action="version", version=f"lilmistral {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a prompt with a model")
    run.add_argument("model", help="a model name (pulled if missing), a model folder or a .gguf file")
    run.add_argument("prompt", nargs="?", help="the question (default: standard input)")
    run.add_argument("--system", help="system prompt")
    run.add_argument("--format", choices=["text", "json"], default="text",
                     help="json: one JSON object with the answer and stats")
    run.add_argument("--markdown", action="store_true", help="render answers as Markdown")
    run.add_argument("--nowordwrap", action="store_true",
                     help="let the terminal break answers' lines anywhere (by default words are kept whole)")
    run.add_argument("--verbose", action="store_true", help="timings after each answer")
    run.add_argument("--resume", action="store_true",
                     help="go on with the latest saved conversation with this model (with a prompt: answer it there)")
    run.add_argument("--no-save", action="store_true",
                     help="do not save the conversation (by default the chat saves it after every answer)")
    _sampling_args(run)
    _load_args(run)
    run.set_defaults(func=cmd_run)

    pull = sub.add_parser("pull", help="download a model and convert it into the store")
    pull.add_argument("model", help="name[:tag] (see models.toml), a Hugging Face repo id[:int4|int8|bf16] (its "
                      "safetensors weights) or repo id:TYPE (its GGUF file of that type, e.g. Q4_K_M)")
    pull.add_argument("--keep-source", action="store_true", help="keep the downloaded original files")
    pull.add_argument("--force", action="store_true", help="convert again even if up to date")
    pull.set_defaults(func=cmd_pull)
    sub.add_parser("list", aliases=["ls"], help="list pulled models").set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="describe a model")
    show.add_argument("model", help="a model name, a model folder or a .gguf file")
    show.add_argument("--pp", type=_at_least(1), default=1, help="also show how N pipeline stages would split it")
    show.set_defaults(func=cmd_show)
    rm = sub.add_parser("rm", help="delete pulled models")
    rm.add_argument("models", nargs="+")
    rm.set_defaults(func=cmd_rm)

    b = sub.add_parser("bench", help="measure prefill and decode speed")
    b.add_argument("model", help="a model name, a converted folder, a HF folder or a .gguf file")
    b.add_argument("--prompt-tokens", type=_at_least(1), default=128)
    b.add_argument("--gen-tokens", type=_at_least(2), default=64, help="the first comes from prefill: at least 2")
    b.add_argument("--json", action="store_true", help="only the JSON line")
    _load_args(b)
    b.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="answer Ollama's and OpenAI's HTTP APIs")
    serve.add_argument("model", nargs="?", help="a model to load now (a name, folder or .gguf); requests may name "
                       "any pulled model")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT,
                       help=f"default {DEFAULT_PORT}, Ollama's (0: any free one)")
    _load_args(serve)
    serve.set_defaults(func=cmd_serve)

    conv = sub.add_parser("convert", help="write a model in lilmistral's packed format")
    conv.add_argument("source", help="a Hugging Face folder or a .gguf file")
    conv.add_argument("--quant", choices=SCHEMES,
                      help="default: int4 for a HF folder; for a .gguf, its own (as run loads it)")
    conv.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
                      help="int4 and int5 group size (32: in super-blocks of 256 or 192 inputs where they divide its "
                           "input size)")
    where = conv.add_mutually_exclusive_group()
    where.add_argument("--out", help="output folder")
    where.add_argument("--name", help="output folder name in the current folder")
    conv.add_argument("--force", action="store_true", help="replace an existing output folder")
    conv.set_defaults(func=cmd_convert)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """build_parser's arguments, where the words of `run`'s prompt may come after options and need no quotes
    (as `ollama run`): argparse gives an optional positional its value at the first chance, so in `run MODEL
    --verbose "prompt"` the prompt would be left over."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra and ns.command == "run" and not any(word.startswith("-") for word in extra):
        ns.prompt = " ".join(extra if ns.prompt is None else [ns.prompt, *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    func: Callable[[argparse.Namespace], int] = ns.func
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return func(ns)
        except LilmistralError as e:
            print(f"Error: {for_stderr(str(e))}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        except OSError as e:
            if e.errno != errno.ENOSPC:  # a full disk is the machine's state, not a bug: no traceback
                raise
            print(f"Error: no space left on the device{f' for {e.filename}' if e.filename else ''}", file=sys.stderr)
            return 1


def run_main() -> None:
    """The `lilmistral` command: main(), then an exit that skips the interpreter's last garbage collection,
    which walks every object PyTorch's modules made (~0.5 s of each command). Objects still go as they are
    released; only cycles left at exit are not collected, and the process is ending."""
    code = main()
    gc.freeze()
    sys.exit(code)
