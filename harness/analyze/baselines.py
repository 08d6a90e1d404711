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
from harness.results.runs import run_folder

META_FILE = "baseline.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def store_baseline(results: Path, directory: Path, name: str | None = None, force: bool = False) -> Path:
    """Copy RESULTS (a results.json or its folder) to DIRECTORY/NAME; an older baseline of that name (a committed
    one, the yardstick of every build) is replaced only with `force`."""
    run = load_run(results)
    source = run_folder(results)
    name = name or run.scenario.get("name", "")
    if not NAME.fullmatch(name):
        raise ResultsError(f"--name: expected letters, digits, '_', '.' or '-' (a folder name), got {name!r}")
    if (directory / name).exists() and not (directory / name / META_FILE).is_file():
        raise ResultsError(f"--dir/--name: {directory / name} exists and is not a baseline (no {META_FILE}): it is "
                           f"never replaced; choose another name")
    if (directory / name / META_FILE).is_file() and not force:
        raise ResultsError(f"--name: baseline {directory / name} exists ({describe(directory / name)}); every gate "
                           f"judges against it, so it is replaced only with --force")
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


def describe(baseline: Path) -> str:
    """"stored 2026-01-01T00:00:00+00:00 at git abc123 from /path/results", as its baseline.json says."""
    try:
        meta = json.loads((baseline / META_FILE).read_text())
    except (OSError, ValueError):
        return f"its {META_FILE} cannot be read"
    return f"stored {meta.get('stored')} at git {meta.get('git_sha')} from {meta.get('source')}"
