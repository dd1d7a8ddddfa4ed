"""The one exception type for user errors: the CLI prints its message as one line and exits 2."""


class LlmneoError(Exception):
    """A problem with the user's config, files or data, with a message that says how to fix it."""
