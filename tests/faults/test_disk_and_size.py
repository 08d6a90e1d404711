"""Faults 3 and 4: a runner that must stay small and never stall outside a timeout, and disks that fill up.

The full disks are real: a tmpfs of a few MiB mounted in a mount namespace of the run's own (unshare), so nothing
outside the test sees it."""

import shlex
import sys

from tests.conftest import scenario_dict
from tests.faults.conftest import cells_by_backend, needs_tmpfs, valid_results


def in_private_tmpfs(mount, size: str, script: str) -> tuple[str, ...]:
    """argv that runs `script` (sh) with a tmpfs of `size` mounted at `mount`, seen by nothing else."""
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))} && {script}")


def test_a_huge_num_requests_fails_its_cell_within_its_timeout(bench, write_scenario, tiny_model, tmp_path):
    """num_requests: 100000000 once made the runner build prompts for minutes, outside any timeout, with torch and
    transformers in its memory. Prompts are now built in a subprocess, under the cell's timeout."""
    w = [{"name": "w", "input_tokens": 16, "output_tokens": 4, "num_requests": 100_000_000}]
    path = write_scenario(scenario_dict(tiny_model, [{"name": "s", "kind": "scripted"}], w, cell_timeout_s=3))
    out = tmp_path / "out"
    run = bench("run", str(path), "--out", str(out))
    assert run.wait(120) == 1, run.output
    cell = cells_by_backend(out)["s"]
    assert cell.status == "failed"
    assert cell.error == "cannot build prompts for model 'tiny': building them took more than cell_timeout_s (3 s)"
    assert run.peak_rss <= 150 * 2**20, f"the runner peaked at {run.peak_rss / 2**20:.0f} MB"
    assert not run.wait_gone(5)

    again = bench("run", str(path), "--out", str(out), "--resume")
    assert again.wait(120) == 1  # completes; the cell fails the same way
    assert "took more than cell_timeout_s" in cells_by_backend(out)["s"].error
    assert not again.wait_gone(5)


@needs_tmpfs
def test_the_bandwidth_probe_never_fails_a_finished_cell_on_a_full_disk(bench, write_scenario, tiny_model, tmp_path):
    """Our engine streams weights from a 40 MiB disk they nearly fill: the probe that follows the measurement (256
    MiB) is skipped with the reason, and the cell keeps its results."""
    offload = tmp_path / "small-disk"
    offload.mkdir()
    own = {"name": "own", "kind": "own", "options": {"weights": "disk", "kv": "cpu", "offload_dir": str(offload)}}
    w = [{"name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": 2}]
    path = write_scenario(scenario_dict(tiny_model, [own], w))
    out = tmp_path / "out"
    run = bench("run", str(path), "--out", str(out), argv_prefix=in_private_tmpfs(offload, "40m", 'exec "$0" "$@"'))
    assert run.wait(300) == 0, run.output
    cell = cells_by_backend(out)["own"]
    assert cell.ok and cell.metrics.value("completed") == 2
    bound = cell.logical_io.decode_bound
    assert "free, too little" in bound.probe_error and "bound_s_per_token" not in bound.model_fields_set
    assert not run.wait_gone(5)

    again = bench("run", str(path), "--out", str(out), "--resume")
    assert again.wait(120) == 0 and "1 cell(s) already ok, 0 to run" in again.output
    assert "own" in (out / "summary.md").read_text()


@needs_tmpfs
def test_a_full_out_folder_is_a_clear_error_and_keeps_what_was_written(bench, write_scenario, tiny_model, tmp_path):
    """--out on a 4 MiB disk that the second cell fills: exit 2 with one line naming the file and the cause, no
    traceback; results.json keeps the first cell. Once the space is freed, --resume completes."""
    disk, saved, marker = tmp_path / "disk", tmp_path / "saved", tmp_path / "fill"
    disk.mkdir()
    marker.touch()
    backends = [{"name": "first", "kind": "scripted"},
                {"name": "filler", "kind": "scripted", "options": {"fill_disk_while_exists": str(marker)}}]
    path = write_scenario(scenario_dict(tiny_model, backends))
    out = disk / "out"
    q = shlex.quote
    bench_cmd = f"{q(sys.executable)} -m harness.cli run {q(str(path))} --out {q(str(out))}"
    script = (f"{bench_cmd}; echo $? > {q(str(tmp_path / 'rc1'))}; cp -r {q(str(out))} {q(str(saved / 'first'))}; "
              f"rm {q(str(marker))} {q(str(out / 'cells' / 'tiny__filler__w' / 'filler'))}; {bench_cmd} --resume; echo $? > {q(str(tmp_path / 'rc2'))}; "
              f"cp -r {q(str(out))} {q(str(saved / 'resumed'))}")
    saved.mkdir()
    run = bench(argv_prefix=in_private_tmpfs(disk, "4m", script), python=None)
    assert run.wait(300) == 0, run.output
    assert (tmp_path / "rc1").read_text().strip() == "2", run.output
    assert "Traceback" not in run.output
    assert "error: cannot write" in run.output and "No space left on device" in run.output
    first = valid_results(saved / "first")
    assert [(c.backend, c.status) for c in first.cells] == [("first", "ok")]

    assert (tmp_path / "rc2").read_text().strip() == "0", run.output
    resumed = valid_results(saved / "resumed")
    assert [(c.backend, c.status) for c in resumed.cells] == [("first", "ok"), ("filler", "ok")]
    assert resumed.cells[0] == first.cells[0]
    assert not run.wait_gone(5)


# Files a crash or a full disk may leave half-written: streams appended as they come (logs, requests.jsonl) and
# folders built aside and renamed into place whole (models, baselines, a Ray actor's own temporary folder).
STREAMED_OR_BUILT_ASIDE = {"harness/run/worker.py", "harness/run/process.py", "harness/run/plan.py",
                           "harness/core/processes.py", "harness/inputs/models.py", "harness/analyze/baselines.py",
                           "harness/run/generators.py"}


def test_every_other_file_is_written_whole_or_not_at_all():
    """Issue 25: cell.json, summary.md, report.md/html, gate.json/md, the guide and calibration.json were written in
    place: a crash or a full disk mid-write left half a file. Every file the harness writes goes through
    harness/core/files.py (a temporary file beside it, fsync, rename) but the ones listed above."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    direct = re.compile(r"\.write_text\(|\.write_bytes\(|\.to_(csv|parquet|json)\((?!tmp\b|\))|open\([^)]*[\"'][wa]b?[\"']")
    offenders = [f"{p.relative_to(root)}:{n}" for pkg in ("harness", "backends") for p in (root / pkg).rglob("*.py")
                 if str(p.relative_to(root)) not in STREAMED_OR_BUILT_ASIDE | {"harness/core/files.py"}
                 for n, line in enumerate(p.read_text().splitlines(), 1) if direct.search(line)]
    assert not offenders, f"written in place: {offenders}"


def test_an_atomic_write_that_fails_keeps_the_old_file_whole(tmp_path, monkeypatch):
    import errno
    import os

    from harness.core.files import atomic_write

    path = tmp_path / "summary.md"
    atomic_write(path, "old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    try:
        atomic_write(path, "new and longer\n" * 1000)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["summary.md"]
