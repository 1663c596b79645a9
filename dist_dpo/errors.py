"""The one exception type for mistakes a user can fix.

A `UserError` is printed as ONE line by global rank 0 (the other ranks stay silent) and the process exits with
code 2. Anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """What is wrong, where (file / row / key), and what to do: one line."""
