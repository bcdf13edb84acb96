"""One exception type for everything a user can get wrong.

The CLI prints a `PerftError` as a single line (no traceback) and exits non-zero, so its
message must name the problem *and* the fix.
"""


class PerftError(Exception):
    """A user-facing error: bad input, impossible settings, incompatible files."""
