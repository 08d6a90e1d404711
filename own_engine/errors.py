"""The engine's one exception type, importable without torch (the harness validates options with EngineConfig)."""


class EngineError(Exception):
    """A problem the user can fix (bad model files, options, budget, disk space); raised before work starts."""
