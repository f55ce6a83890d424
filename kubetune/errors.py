"""The one error type users see: a problem they can fix, with a message naming what and how.

The CLI prints it as `error: ...` and exits 2, without a traceback. Subclass it (ConfigError,
checkpoint and tokenizer errors, ...) rather than raising bare exceptions from deep inside.
"""


class KubetuneError(Exception):
    """A user-fixable problem; the message names the file or field and the fix."""
