"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""


class LilmistralError(Exception):
    """Base class: anything caused by input, files or the environment rather than a bug."""


class ModelFormatError(LilmistralError):
    """A model file or folder is missing, truncated or of an unsupported kind."""


class ContextLengthError(LilmistralError):
    """A prompt does not fit the model's context (num_ctx)."""
