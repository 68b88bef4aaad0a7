"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""
import sys
import warnings


class LilmistralError(Exception):
    """Base class: anything caused by input, files or the environment rather than a bug."""


class ModelFormatError(LilmistralError):
    """A model file or folder is missing, truncated or of an unsupported kind."""


class ContextLengthError(LilmistralError):
    """A prompt does not fit the model's context (num_ctx)."""


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """For warnings.showwarning in lilmistral's processes: its own warnings ("lilmistral: ...") as one line, as
    its errors are; others as Python shows them."""
    text = str(message)
    if text.startswith("lilmistral: "):
        print(f"Warning: {text.removeprefix('lilmistral: ')}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)
