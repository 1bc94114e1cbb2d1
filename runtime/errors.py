"""The one user-facing error type: its message is a single line naming the problem and what to do."""


class OrthrusError(Exception):
    """Bad input or a mismatch the user can fix. The CLI prints it as one line and exits with code 2."""
