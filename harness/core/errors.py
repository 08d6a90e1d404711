"""Errors that cross the backend boundary and the user-input errors every command reports the same way."""


class UserError(Exception):
    """A mistake the user can fix (a scenario, a results file, a policy): printed without a traceback, exit code 2."""


class BackendError(Exception):
    """An engine failed in a way the user should read: the cell is marked failed with this message."""
