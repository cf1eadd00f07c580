"""The one exception type for bad user input: the CLI prints its message alone and exits 2."""


class DiagError(Exception):
    """A problem with what the user gave us (a flag, a file, a name), stated in one line."""

    exit_code = 2
