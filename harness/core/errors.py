"""Errors that cross the backend boundary and the user-input errors every command reports the same way."""


class UserError(Exception):
    """A mistake the user can fix (a scenario, a results file, a policy): printed without a traceback, exit code 2."""


class BackendError(Exception):
    """An engine failed in a way the user should read: the cell is marked failed with this message."""


def describe(e: BaseException) -> str:
    """'Type: message' for a failed request or cell, never with an empty message: some exceptions carry none
    (httpx.ReadTimeout('')), so their cause's message, or their class's own description, is used instead."""
    message = ""
    cause: BaseException | None = e
    while cause is not None and not message:
        message = str(cause).strip()
        cause = cause.__cause__ or cause.__context__
    if not message:
        doc = (type(e).__doc__ or "").strip()
        message = doc.splitlines()[0] if doc else "(the exception carries no message)"
    return f"{type(e).__name__}: {message}"
