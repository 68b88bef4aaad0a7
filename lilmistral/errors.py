"""Errors a user can cause. The CLI prints their message on one line and exits non-zero; text for a terminal is
made `visible` first."""
import sys
import warnings


class LilmistralError(Exception):
    """Base class: anything caused by input, files or the environment rather than a bug."""


class ModelFormatError(LilmistralError):
    """A model file or folder is missing, truncated or of an unsupported kind."""


class ContextLengthError(LilmistralError):
    """A prompt does not fit the model's context (num_ctx)."""


# Control characters (but newline and tab) shown as `cat -v` shows them, where text goes to a terminal: a model's
# answer, a template or a loaded conversation could carry escape sequences (a title, the clipboard, the cursor).
# A carriage return is dropped, as rich drops it.
VISIBLE: dict[int, str | None] = {
    **{c: f"^{chr(c ^ 64)}" for c in [*range(32), 127] if chr(c) not in "\n\t"},
    **{c: f"M-^{chr(c ^ 192)}" for c in range(128, 160)},
    ord("\r"): None,
}


def visible(text: str) -> str:
    return text.translate(VISIBLE)


def for_stderr(text: str) -> str:
    return visible(text) if sys.stderr.isatty() else text


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """For warnings.showwarning in lilmistral's processes: its own warnings ("lilmistral: ...") as one line, as
    its errors are; others as Python shows them."""
    text = str(message)
    if text.startswith("lilmistral: "):
        print(f"Warning: {for_stderr(text.removeprefix('lilmistral: '))}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)
