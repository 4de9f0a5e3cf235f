"""The one exception type a user can cause: the CLI turns it into one sentence and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (paths, indices, shapes, settings), not a bug."""


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds (asserts vanish under ``python -O``)."""
    if not condition:
        raise UserError(message)


def first_line(e: BaseException) -> str:
    """The first line of a library's exception, to end a one-sentence message with."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
