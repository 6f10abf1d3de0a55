"""The one exception type data_tools raises for bad input or bad state.

The CLI prints its message (which names the file/line/field and the fix) and exits non-zero,
without a traceback; anything else escaping is a bug and keeps its traceback.
"""


class DataToolsError(Exception):
    """A user-facing error: the message says what is wrong, where, and how to fix it."""
