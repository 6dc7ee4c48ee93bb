"""One exception type for every mistake a user can make.

The CLI catches :class:`CoaloraError` and prints its message as a single line, so each message must say
what is wrong *and* how to fix it.
"""


class CoaloraError(ValueError):
    """A user-facing error whose message is one line: what is wrong and how to fix it."""
