"""The one exception type for bad user input, so the CLI can answer it with one line."""


class MaasInputError(ValueError):
    """A problem with what the user gave us (a file, a column, a config value).

    The message is a single line that names the offending thing; the CLI prints it as is
    and exits non-zero, and no retry can fix it.
    """
