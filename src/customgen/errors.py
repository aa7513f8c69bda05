"""Errors users can act on: one line, what is wrong and what to do (the CLI exits 2 on these)."""


class UserError(Exception):
    """Bad input, missing data or an unreachable model: the message is the whole story, no traceback."""


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


class Notice(UserWarning):
    """A one-line notice for users (deprecated id, fallback taken); the CLI prints these and hides the rest."""
