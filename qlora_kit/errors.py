"""The one exception type for mistakes a user can make; the CLI prints it as a sentence and a hint."""


class UserError(Exception):
    """A problem with the user's input or machine, not a bug: shown without a traceback."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):  # keeps the hint when the error travels between processes (distributed training)
        return UserError, (self.message, self.hint)
