"""User-facing errors.

Anything a user can cause (a wrong path, a corrupt file, a bad option) is raised as a `LlamalabError`
with a one-line message that names the file, field or value and says what to do. The CLI prints that
line and exits non-zero; it never shows a traceback for these.
"""


class LlamalabError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class CheckpointError(LlamalabError):
    """A checkpoint is missing, truncated, corrupt or of an unsupported architecture."""


class ContextLengthError(LlamalabError):
    """A prompt (plus the tokens asked for) does not fit in the model's context."""
