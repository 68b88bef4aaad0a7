"""The interactive chat: `lilmistral run NAME` with no prompt.

`Chat` holds the conversation and options and knows nothing of terminals; `repl()` is the prompt-toolkit
loop around it; slash commands are a table of small handlers.
"""
from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import LilmistralError, visible
from .generate import RECOMMENDABLE, SamplingParams
from .llm import LLM, Thinking
from .store import human_parameters, write_durably
from .tokenizer import Message

HELP = """Available commands:
  /set temperature|top_p|top_k|repeat_penalty|repeat_last_n|seed|num_ctx|max_tokens VALUE
  /set system "text"       set the system prompt (/set system "" removes it)
  /set verbose|quiet       show (or not) the timings after each answer
  /set wordwrap|nowordwrap keep words whole at the line's end (or let the terminal break them)
  /set format json|noformat answer with one JSON object (or freely)
  /show info|parameters|template|system
  /clear                   forget the conversation (the next one is saved in a file of its own)
  /save FILE               save the conversation as JSON
  /load FILE               load a conversation saved with /save
  /bye                     exit (or Ctrl-D)
  /?, /help                this help

Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer (what was written is kept).
The conversation is saved after every answer; `lilmistral run MODEL --resume` goes on with the latest."""

SETTABLE = {**RECOMMENDABLE, "seed": int, "max_tokens": int, "num_ctx": int}
OLLAMA_NAMES = {"num_predict": "max_tokens"}


@dataclass
class Chat:
    llm: LLM
    params: SamplingParams | None = None  # default: the model's recommended options over SamplingParams' defaults
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    told_overflow: bool = False
    autosave: AutoSave | None = None  # where the conversation is saved after every answer
    verbose: bool = False  # the timings after each answer
    wrap: bool = True  # words kept whole at the terminal's line ends

    def __post_init__(self) -> None:
        if self.params is None:
            self.params = SamplingParams(**self.llm.sampling_defaults)

    @property
    def model(self) -> str:
        """The model's source as an absolute path: which model a saved conversation was with."""
        return str(Path(self.llm.source).resolve()) if self.llm.source else ""

    def conversation(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`. The answer joins the conversation even when the stream is cut short."""
        # bytes that were not UTF-8 (Python's stdin and arguments, and prompt-toolkit, keep them as lone
        # surrogates, which no tokenizer or saved file takes) become U+FFFD
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        self.messages.append({"role": "user", "content": text})
        answer: list[str] = []
        try:
            kwargs = {f.name: getattr(self.params, f.name) for f in fields(self.params)}
            for piece in self.llm.chat(self.conversation(), **kwargs):
                if not isinstance(piece, Thinking):  # the conversation keeps the answer, as Ollama's
                    answer.append(piece)
                yield piece
        except LilmistralError:
            self.messages.pop()  # the question could not be asked (it does not fit): forget it
            raise
        finally:  # also on Ctrl-C: a partial answer is kept; a question with no answer yet is dropped
            if self.messages and self.messages[-1] == {"role": "user", "content": text}:
                if answer:
                    self.messages.append({"role": "assistant", "content": "".join(answer)})
                else:
                    self.messages.pop()
            if self.autosave is not None:
                self.autosave.save(self)

    def clear(self) -> None:
        """Forget the conversation; the next one is autosaved in a file of its own."""
        self.messages.clear()
        self.told_overflow = False
        if self.autosave is not None:
            self.autosave.path = None

    def notice(self) -> str | None:
        """After an answer: that the conversation outgrew the context (once), whether the context cut the
        answer short, and that it is saved in a new file."""
        lines = []
        if self.llm.stats.dropped_messages and not self.told_overflow:
            self.told_overflow = True
            lines.append(f"(the conversation is longer than num_ctx={self.llm.num_ctx}: its oldest turns are left "
                         "out from now on; /set num_ctx to raise it)")
        if self.llm.stats.done_reason == "context":
            lines.append(f"(the answer filled the context, num_ctx={self.llm.num_ctx}: raise it with /set num_ctx "
                         "or --num-ctx)")
        if self.autosave is not None and self.autosave.moved:
            lines.append(self.autosave.moved)
            self.autosave.moved = None
        return "\n".join(lines) or None

    def set(self, key: str, value: str) -> str:
        if key == "system":
            self.system = value or None
            return "Set system message." if value else "Cleared system message."
        key = OLLAMA_NAMES.get(key, key)
        if key not in SETTABLE:
            raise LilmistralError(f"unknown parameter {key!r}; try: {', '.join(SETTABLE)}, system")
        try:
            parsed = SETTABLE[key](value)
        except ValueError:
            raise LilmistralError(f"{key} needs a {SETTABLE[key].__name__}, not {value!r}") from None
        if key == "num_ctx":
            self.llm.resize_context(parsed)
            return f"Set parameter 'num_ctx' to '{self.llm.num_ctx}'"
        trial = SamplingParams(**{**self.params.__dict__, key: parsed})
        trial.validate()
        self.params = trial
        return f"Set parameter '{key}' to '{parsed}'"

    def save(self, path: Path) -> None:
        data = {"model": self.model, "system": self.system, "messages": self.messages,
                "options": {k: v for k, v in self.params.__dict__.items() if k != "stop"}}
        try:
            write_durably(path, json.dumps(data, indent=1, ensure_ascii=False))
        except OSError as e:
            raise LilmistralError(f"could not save the conversation to {path}: {e.strerror or e}") from None

    def load(self, path: Path) -> int:
        """Take the conversation, system prompt and options saved in `path` (`save`'s JSON), all checked first."""
        try:
            data = json.loads(path.read_text())
            messages, system = data["messages"], data.get("system")
            ok = all(m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str) for m in messages)
            options = {k: v if v is None else SETTABLE[k](v) for k, v in (data.get("options") or {}).items()
                       if k in SETTABLE and k != "num_ctx"}
            params = SamplingParams(**{**self.params.__dict__, **options})
            params.validate()
        except (OSError, ValueError, KeyError, AttributeError, TypeError, LilmistralError) as e:
            raise LilmistralError(f"{path}: not a saved conversation ({e})") from None
        if not ok or not isinstance(system, str | None):
            raise LilmistralError(f"{path}: messages must be user/assistant with text content, the system prompt text")
        if [m["role"] for m in messages] != ["user", "assistant"] * (len(messages) // 2):
            raise LilmistralError(f"{path}: messages must alternate user, assistant, ..., ending with an answer")
        self.messages, self.system, self.params = messages, system, params
        return len(messages)


@dataclass
class AutoSave:
    """Each conversation in a JSON file of its own in `folder` (Chat.save's format), rewritten after every
    answer, a stopped one too: a crash, a closed terminal or Ctrl-D loses nothing. `latest` finds the one to
    resume. A file another chat rewrote since this one read or wrote it (the same conversation resumed in two
    terminals) is left as it is: this chat goes on in a file of its own."""
    folder: Path
    label: str  # the model as the user named it, for the files' names
    path: Path | None = None  # this conversation's file, named at its first save
    version: tuple[int, int] | None = None  # the file's (inode, mtime) as this chat last read or wrote it
    moved: str | None = None  # a notice for the user that the conversation went on in a new file

    def resume(self, chat: Chat) -> Path | None:
        """Load the latest conversation with chat's model into it, to go on in its file; None if there is none."""
        path = self.latest(chat.model)
        if path is not None:
            self.version = _version(path)  # before reading: a rewrite in between is seen as one
            chat.load(path)
            self.path = path
        return path

    def save(self, chat: Chat) -> None:
        if not chat.messages:
            return
        try:
            if self.path is not None and _version(self.path) != self.version:
                rewritten, self.path = self.path, self._new_file()
                self.moved = f"({rewritten.name} was changed by another chat; this one goes on in {self.path})"
            self.path = self.path or self._new_file()
            chat.save(self.path)
            self.version = _version(self.path)
        except OSError as e:
            raise LilmistralError(f"could not save the conversation to {self.path or self.folder}: {e}") from None

    def _new_file(self) -> Path:
        """A new file, created empty so that another chat starting in the same second takes the next name."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # conversations are private
        model = re.sub(r"[^\w.]+", "-", Path(self.label).name).strip("-.") or "model"
        stem = time.strftime("%Y%m%d-%H%M%S-") + model
        names = (f"{stem}.json" if n == 1 else f"{stem}-{n}.json" for n in itertools.count(1))
        return next(self.folder / name for name in names if _created(self.folder / name))

    def latest(self, model: str) -> Path | None:
        """The conversation with `model` (Chat.model) saved last in the folder, if any."""
        saved = []
        for path in self.folder.glob("*.json"):
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict) and data.get("model") == model:
                    saved.append((path.stat().st_mtime, path))
            except (OSError, ValueError):  # unreadable, or removed meanwhile: not one to resume
                continue
        return max(saved)[1] if saved else None


def _created(path: Path) -> bool:
    try:
        path.open("x").close()
    except FileExistsError:
        return False
    return True


def _version(path: Path) -> tuple[int, int] | None:
    """Which write of a file this is: Chat.save replaces the file, so each write is a new inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def recap(chat: Chat, path: Path) -> str:
    """What resuming a conversation shows: where it came from and its last exchange."""
    lines = [f"Resumed {len(chat.messages)} messages from {path}"]
    if chat.messages:  # they alternate, ending with an answer (Chat.load)
        question, answer = chat.messages[-2:]
        lines += [f">>> {question['content']}", answer["content"]]
    return "\n".join(lines)


def show(chat: Chat, what: str) -> str:
    llm = chat.llm
    if what == "info":
        a = llm.args
        lines = [f"  architecture   {a.architecture}", f"  parameters     {human_parameters(a.n_parameters)}",
                 f"  context        {llm.num_ctx}" + (f" (sliding window {a.sliding_window})" if a.sliding_window else ""),
                 f"  quantization   {llm.info.get('quant', '?')}", f"  tokenizer      {llm.tokenizer.kind}"]
        if chat.autosave is not None and chat.autosave.path is not None:
            lines.append(f"  saved to       {chat.autosave.path}")
        return "\n".join(lines)
    if what == "parameters":
        p = chat.params
        return "\n".join(f"  {k:16s}{getattr(p, k)}" for k in SETTABLE if k != "num_ctx") + f"\n  {'num_ctx':16s}{llm.num_ctx}"
    if what == "template":
        tokenizer = llm.tokenizer
        if tokenizer.instruct_version is not None:
            return (f"Mistral's instruct format v{tokenizer.instruct_version} ({tokenizer.kind}), as mistral_common "
                    "encodes it")
        return getattr(tokenizer, "chat_template", None) or "none in the model"
    if what == "system":
        return chat.system or "No system message was specified."
    raise LilmistralError("usage: /show info|parameters|template|system")


def run_command(chat: Chat, line: str) -> str | None:
    """Run a slash command; returns text to print. Raises EOFError for /bye."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise LilmistralError(f"cannot parse the command: {e}") from None
    command, args = words[0].lower(), words[1:]
    handler = COMMANDS.get(command)
    if handler is None:
        raise LilmistralError(f"unknown command {command!r}; /help lists them")
    return handler(chat, args)


def _set(chat: Chat, args: list[str]) -> str:
    if args[:1] == ["parameter"]:  # Ollama's form: /set parameter NAME VALUE
        args = args[1:]
    if args in (["verbose"], ["quiet"]):
        chat.verbose = args == ["verbose"]
        return f"Set '{args[0]}' mode."
    if args in (["wordwrap"], ["nowordwrap"]):
        chat.wrap = args == ["wordwrap"]
        return f"Set '{args[0]}' mode."
    if args in (["format", "json"], ["noformat"]):  # JSON mode, as Ollama's
        chat.params = replace(chat.params, format="json" if args[0] == "format" else None)
        return "Set format to 'json' mode." if args[0] == "format" else "Disabled format."
    if len(args) != 2 and not (args and args[0] == "system"):
        raise LilmistralError("usage: /set PARAMETER VALUE (or /set system \"text\")")
    return chat.set(args[0], " ".join(args[1:]) if args[0] == "system" else args[1])


def _file_arg(args: list[str], usage: str) -> Path:
    if len(args) != 1:
        raise LilmistralError(usage)
    return Path(args[0]).expanduser()


def _bye(chat: Chat, args: list[str]) -> str:
    raise EOFError


def _clear(chat: Chat, args: list[str]) -> str:
    chat.clear()
    return "Cleared session context."


def _save(chat: Chat, args: list[str]) -> str:
    path = _file_arg(args, "usage: /save FILE")
    chat.save(path)
    return f"Saved the conversation to {path}"


def _load(chat: Chat, args: list[str]) -> str:
    path = _file_arg(args, "usage: /load FILE")
    return f"Loaded {chat.load(path)} messages from {path}"


def _show(chat: Chat, args: list[str]) -> str:
    return show(chat, args[0] if len(args) == 1 else "")


COMMANDS: dict[str, Callable[[Chat, list[str]], str | None]] = {
    "/set": _set, "/show": _show, "/clear": _clear, "/save": _save, "/load": _load,
    "/bye": _bye, "/exit": _bye, "/help": lambda c, a: HELP, "/?": lambda c, a: HELP,
}


def stats_text(llm: LLM, total_s: float, load_s: float | None = None) -> str:
    """Ollama's --verbose statistics of the last answer (with the model's load, for a one-shot run)."""
    s = llm.stats
    prefill_rate = s.prefill_tokens / s.prefill_s if s.prefill_s else 0.0
    eval_rate = (s.eval_tokens - 1) / s.eval_s if s.eval_s else 0.0  # the first token's time is prompt eval
    cached = s.prompt_tokens - s.prefill_tokens
    lines = [f"total duration:       {total_s:.3f}s",
             f"prompt eval count:    {s.prefill_tokens} token(s) ({cached} from the cache)",
             f"prompt eval duration: {s.prefill_s:.3f}s",
             f"prompt eval rate:     {prefill_rate:.2f} tokens/s",
             f"eval count:           {s.eval_tokens} token(s)",
             f"eval duration:        {s.eval_s:.3f}s",
             f"eval rate:            {eval_rate:.2f} tokens/s ({llm.decode_step.mode} decode step)"]
    if load_s is not None:
        lines.insert(1, f"load duration:        {load_s:.3f}s")
    return "\n".join(lines)


def say(console: Any, text: str, style: str | None = None) -> None:
    """Print plain text: no markup parsing, no highlighting (model output and file names are not markup)."""
    console.print(visible(text) if console.is_terminal else text, style=style, markup=False, highlight=False)


class WrappedAnswer:
    """An answer streamed to a terminal with its words wrapped at the terminal's width, as Ollama wraps them: a
    word that reaches the last column is erased and written again at the start of the next line (it was shown as
    it came); a word of half a line or more is broken there instead."""

    def __init__(self, file: Any, width: Callable[[], int]) -> None:
        self.file, self.width = file, width
        self.column = 0
        self.word = ""  # the word being written, as far as it is on this line

    def write(self, text: str) -> None:
        from rich.cells import cell_len

        width, out = self.width(), []
        for char in visible(text):
            if char == "\n":
                out.append(char)
                self.column, self.word = 0, ""
                continue
            cells = 8 - self.column % 8 if char == "\t" else cell_len(char)
            if self.column + cells >= width:  # the last column stays empty: the cursor never waits there to wrap
                if char in " \t":  # the line ends at the space: the next does not begin with it
                    out.append("\n")
                    self.column, self.word = 0, ""
                    continue
                moved = cell_len(self.word) if self.word and cell_len(self.word) < width // 2 else 0
                out.append(f"\x1b[{moved}D\x1b[K\n{self.word}" if moved else "\n")
                self.column, self.word = moved, self.word if moved else ""
            out.append(" " * cells if char == "\t" else char)
            self.column += cells
            self.word = "" if char in " \t" else self.word + char
        self.file.write("".join(out))
        self.file.flush()


FENCE = re.compile(r" {0,3}(```|~~~)")


def finished_blocks(text: str) -> int:
    """How much of a Markdown text streaming in is whole blocks: up to its last blank line outside a code fence
    that a line starting in its first column follows (an indented one may go on a list item). 0: none yet."""
    end, fenced, at, after_blank = 0, False, 0, None
    for line in text.splitlines(keepends=True):
        if after_blank is not None and not line[:1].isspace():
            end = after_blank
        after_blank = None
        at += len(line)
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and not line.strip() and line.endswith("\n"):
            after_blank = at
    return end


class MarkdownAnswer:
    """An answer rendered as Markdown as it streams: each whole block (`finished_blocks`) is printed once, as rich
    renders it after the block before it, and only the rest is redrawn (rich's Live), at most 8 times a second.
    Redrawing the whole answer at every token parsed all of it a token, and an answer taller than the screen was
    drawn again below itself at every frame (a screen cannot be redrawn above its top)."""

    def __init__(self, console: Any) -> None:
        from rich.live import Live

        self.console, self.tail, self.drawn = console, "", 0.0
        self.last, self.last_lines = "", 0  # the block printed last, and the lines it takes where it begins
        self.live = Live(console=console, auto_refresh=False, vertical_overflow="visible")

    def __enter__(self) -> MarkdownAnswer:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:  # also on Ctrl-C: what came last is printed
        self._print(self.tail)
        self.live.stop()

    def write(self, text: str) -> None:
        self.tail += visible(text)
        if cut := finished_blocks(self.tail):
            self._print(self.tail[:cut])
            self.tail = self.tail[cut:]
            self._draw()
        elif time.perf_counter() - self.drawn > 0.125:
            self._draw()

    def _print(self, block: str) -> None:
        """Print a block above the live part: its lines where it follows the last block (their spacing)."""
        from rich.console import Group
        from rich.markdown import Markdown
        from rich.segment import Segment, Segments

        lines = self.console.render_lines(Markdown(self.last + block), pad=False)[self.last_lines:]
        self.live.update(Group())  # no lines: what the live part showed is erased, and at the end nothing is left
        self.console.print(Segments(s for line in lines for s in (*line, Segment.line())), end="")
        self.last, self.last_lines = block, len(self.console.render_lines(Markdown(block), pad=False))

    def _draw(self) -> None:
        """Redraw the unfinished block; one taller than the screen by its last lines (a live part that reaches above
        the screen's top cannot be erased: it was drawn again below itself at every frame)."""
        from rich.markdown import Markdown
        from rich.segment import Segment, Segments

        lines = self.console.render_lines(Markdown(self.tail), pad=False)[-max(self.console.height - 1, 1):]
        self.live.update(Segments(s for i, line in enumerate(lines) for s in (*([Segment.line()] if i else []), *line)),
                         refresh=True)
        self.drawn = time.perf_counter()


def thinking_marked(pieces: Iterator[str]) -> Iterator[str]:
    """An answer's pieces with its thinking between "Thinking..." and "...done thinking." lines, as Ollama shows it."""
    thinking = False
    for piece in pieces:
        if isinstance(piece, Thinking) != thinking:
            thinking = not thinking
            yield "Thinking...\n" if thinking else "\n...done thinking.\n\n"
        yield piece


def stream_answer(chat: Chat, text: str, console: Any, markdown: bool, verbose: bool, notices: Any = None,
                  wrap: bool = True) -> None:
    """Print the answer as it streams (at a terminal: control characters made visible and, unless `wrap` is
    False, words wrapped); Ctrl-C stops it and keeps what was written. Notices about the context go to `notices`
    (default: the console)."""
    start = time.perf_counter()
    pieces = chat.ask(text)
    try:
        if markdown and console.is_terminal:
            with MarkdownAnswer(console) as answer:
                for piece in thinking_marked(pieces):
                    answer.write(piece)
        else:
            if console.is_terminal:
                write = WrappedAnswer(console.file, lambda: console.width if wrap else sys.maxsize).write
            else:
                def write(piece: str) -> None:
                    console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
                    console.file.flush()
            for piece in thinking_marked(pieces):
                write(piece)
            console.print()
    except KeyboardInterrupt:
        say(console, "\n(stopped)", "dim")
    finally:  # whatever stopped the answer (also an exit): the conversation keeps, and saves, what was written
        pieces.close()
    if notice := chat.notice():
        say(notices or console, notice, "yellow")
    if verbose:
        say(console, stats_text(chat.llm, time.perf_counter() - start), "dim")


def read_message(session: Any, first: str) -> str:
    """A line, or a block between lines of \"\"\" (Ollama's convention)."""
    stripped = first.strip()
    if not stripped.startswith('"""'):
        return first
    body = stripped[3:]
    if body.endswith('"""'):
        return body[:-3]
    lines = [body] if body else []
    while True:
        line = session.prompt("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def repl(chat: Chat, console: Any, history: Path, markdown: bool = False) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    history.parent.mkdir(parents=True, exist_ok=True)
    session: PromptSession = PromptSession(history=FileHistory(str(history)))
    say(console, "Type a message, /? for help, Ctrl-D or /bye to exit.", "dim")
    while True:
        try:
            line = session.prompt(">>> ")
            if line.startswith("/"):
                if (output := run_command(chat, line)) is not None:
                    say(console, output)
                continue
            text = read_message(session, line)
        except KeyboardInterrupt:
            say(console, "Use Ctrl + d or /bye to exit.")
            continue
        except EOFError:
            return
        except LilmistralError as e:
            say(console, f"Error: {e}", "red")
            continue
        if not text.strip():
            continue
        try:
            stream_answer(chat, text, console, markdown, chat.verbose, wrap=chat.wrap)
            console.print()  # a blank line between an answer and the next prompt, as Ollama leaves
        except LilmistralError as e:
            say(console, f"Error: {e}", "red")
