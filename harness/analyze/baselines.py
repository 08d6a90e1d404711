"""`bench baseline update`: store a run as a self-contained gate baseline (docs/gate.md).

A baseline folder holds results.json, each ok cell's cells/<id>/requests.jsonl (the gate's per-request samples)
and baseline.json (when, from where, at which commit), so it can be committed and `bench gate --baseline` reads it
like any results folder.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from harness.measure import environment
from harness.records import ResultsError, load_run

META_FILE = "baseline.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def store_baseline(results: Path, directory: Path, name: str | None = None) -> Path:
    """Copy RESULTS (a results.json or its folder) to DIRECTORY/NAME, replacing an older baseline of that name."""
    run = load_run(results)
    source = results if results.is_dir() else results.parent
    name = name or run.scenario.get("name", "")
    if not NAME.fullmatch(name):
        raise ResultsError(f"--name: expected letters, digits, '_', '.' or '-' (a folder name), got {name!r}")
    ok = [c for c in run.cells if c.ok]
    if not ok:
        raise ResultsError(f"{source}: no cell finished ok, nothing worth a baseline")
    requests = []
    for c in ok:
        path = c.requests_path(source)
        if not path.is_file():
            raise ResultsError(f"{path}: missing; a baseline needs every ok cell's requests file")
        requests.append(path.relative_to(source))

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    # Built beside the target and swapped in, so an interrupted update never leaves half a baseline.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        shutil.copy2(source / "results.json" if results.is_dir() else results, tmp / "results.json")
        for rel in requests:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, tmp / rel)
        (tmp / META_FILE).write_text(json.dumps({
            "name": name,
            "stored": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_sha": environment.git_sha(),
            "source": str(source.resolve()),
            "source_created": run.created,
            "source_updated": run.updated,
            "cells": [c.id for c in ok],
        }, indent=1))
        old = None
        if target.exists():
            old = target.rename(directory / f"{tmp.name}.old")
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
