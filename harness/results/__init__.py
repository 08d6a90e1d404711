"""Results: the reducer, the metric catalogue, results.json, the summary, and the results as DataFrames.

`harness.results.to_dataframe(paths)` (frame.py) is imported on first use: pandas is not loaded by a worker."""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "to_dataframe":
        from harness.results.frame import to_dataframe

        return to_dataframe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
