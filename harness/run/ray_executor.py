"""`bench run --executor ray`: each cell a Ray task on a node that has what its backend's `placement:` asks for.

On the node the task plans the cell (the model folder and prompts are resolved or built there, never shipped through
the object store), runs the same worker subprocess as a local run (with the backend's `python:`), and returns the
cell folder's files; the head writes them into `--out` and reduces them as a local run does, so results.json is the
same. Cells of one backend run one at a time per node (a lock actor, `NodeLocks`); different nodes run in parallel,
at most `--max-parallel` at once. A cell that fails, or whose node dies, is tried again up to `--max-retries` times,
on another node where one fits, and is then failed. Ctrl-C cancels every task (force: its Ray worker is killed; the
worker subprocess sees its parent gone and stops its servers, harness/run/worker.py watch_runner).

Ray shows a task's arguments and runtime_env to whoever can reach its dashboard or state API, so neither carries a
secret: each task gets the scenario masked (harness/core/redact.py), and puts each masked value back from the
variable of its name in the node's own environment (HF_TOKEN, API_KEY for `--api_key`: set them where the nodes'
`ray start` runs); a secret-named LLMBENCH_ variable is never forwarded.

Ray is imported here only, and only when this executor runs: a local run never imports it."""

from __future__ import annotations

import io
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import Progress

from harness.config.scenario import Cell, Scenario
from harness.core.errors import UserError, describe
from harness.core.files import atomic_write, cache_root
from harness.core.processes import GROUPS_FILE
from harness.core.redact import Redactor, is_secret_name, restore
from harness.core.spec import BackendSpec, Placement
from harness.records import CellResult, NodeAttempt
from harness.run.attempt import Attempt, attempt_cell
from harness.run.plan import CellPlanner
from harness.run.process import Interrupted

if TYPE_CHECKING:
    from harness.run.runner import Runner

POLL_S = 0.2  # how often finished tasks are looked for: a sleep in Python, where Ctrl-C is seen (inside Ray's C++
# wait, the signal handler's exception is lost to a SystemError)
CANCEL_GRACE_S = 30.0  # for cancelled tasks to stop their workers and servers before they are killed
LOCK_POLL_S = 0.2
HEAD_NODE = "node:__internal_head__"
FORWARDED_ENV = ("LLMBENCH_",)  # the harness's own settings (plugins, cache) reach the tasks, its secrets never


class ClusterError(UserError):
    """No Ray, or no cluster at --address: said in one line, exit code 2."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--executor ray: Ray is not installed here (pip install -e '.[ray]')") from None
    return ray


def connect(ray, address: str | None) -> bool:
    """Connect this process to the cluster at `address` (None: RAY_ADDRESS); True when this call connected (and so
    should disconnect)."""
    if ray.is_initialized():
        return False
    if address is None and "RAY_ADDRESS" not in os.environ:
        # Ray 2.60's GCS and raylets listen on every interface whatever node IP they are given, and servers the
        # harness starts bind 127.0.0.1 only: the harness never starts a cluster, its user does (docs/scale-out.md).
        raise ClusterError("no Ray cluster given: pass --address (auto, HOST:6379 or ray://HOST:10001) or set "
                           "RAY_ADDRESS, after starting one with `ray start --head` (docs/scale-out.md)")
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": False, "logging_level": "warning"}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"--address {address or os.environ.get('RAY_ADDRESS', '(local)')}: cannot connect to a Ray "
                           f"cluster: {e}") from None
    return True


def placement_options(p: Placement) -> dict[str, Any]:
    """Ray's task or actor options for a `placement:`."""
    opts: dict[str, Any] = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus, "resources": dict(p.resources)}
    if p.accelerator_type:
        opts["accelerator_type"] = p.accelerator_type
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) and not is_secret_name(k)}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


class NodeLocks:
    """A Ray actor: at most one cell per key (backend@node) at a time. Tasks poll `acquire`; the head releases a
    holder's keys when its task ends, however it ends (a killed task cannot release its own)."""

    def __init__(self):
        self.held: dict[str, str] = {}
        self.nodes: dict[str, str] = {}

    def acquire(self, key: str, holder: str, node_id: str) -> bool:
        self.nodes[holder] = node_id
        return self.held.setdefault(key, holder) == holder

    def release(self, holder: str, key: str | None = None) -> None:
        """The holder's `key`, or every key it holds."""
        self.held = {k: h for k, h in self.held.items() if h != holder or key not in (None, k)}

    def node_of(self, holder: str) -> str | None:
        return self.nodes.get(holder)

    def running(self) -> dict[str, str]:
        """Holder → node of every cell that holds its backend's lock (it is running there)."""
        return {h: self.nodes[h] for k, h in self.held.items() if not k.startswith("plan@")}


@dataclass
class Shipped:
    """What a node's task returns: how the attempt ended, the cell folder's files and the prompts file it used."""
    attempt: Attempt
    files: dict[str, bytes]
    prompts: tuple[str, bytes] | None


def run_on_node(masked: dict[str, Any], cell: Cell, holder: str, locks) -> Shipped:
    """The Ray task, on the node Ray placed it on: `masked` is the scenario with its secrets masked, put back here
    from the node's environment."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    data, missing = restore(masked, os.environ)
    if missing:
        return Shipped(Attempt(error=f"the scenario's secrets travel to Ray nodes only through the nodes' own "
                                     f"environment; on node {node_id} set: {', '.join(sorted(set(missing)))}",
                               node={"ray_node_id": node_id}), {}, None)
    scenario = Scenario.model_validate(data)
    # The worker subprocess joins this cluster when its load has generators (harness/run/generators.py).
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    def hold(key: str) -> None:
        while not ray.get(locks.acquire.remote(key, holder, node_id)):
            time.sleep(LOCK_POLL_S)

    work = cache_root() / "ray"
    cell_dir = work / "cells" / holder
    cell_dir.mkdir(parents=True)
    try:
        planner = CellPlanner(scenario, work, Console(file=io.StringIO()))
        hold(f"{cell.backend}@{node_id}")
        # Models and prompts are built by one cell of the node at a time (builders of the same files must not race);
        # attempt_cell then plans again from what was built, or says why it could not be.
        hold(f"plan@{node_id}")
        try:
            planner.plan(cell)
        except Exception:
            pass
        finally:
            ray.get(locks.release.remote(holder, f"plan@{node_id}"))
        attempt = attempt_cell(planner, cell, cell_dir, scenario.cell_timeout_s, lambda: None,
                               Redactor(scenario.model_dump(mode="json")))
        attempt.node |= {"ray_node_id": node_id, "ip": ray.util.get_node_ip_address()}
        # The record of launched groups names this node's processes: never to be killed from the head.
        files = {str(p.relative_to(cell_dir)): p.read_bytes() for p in sorted(cell_dir.rglob("*"))
                 if p.is_file() and p.name != GROUPS_FILE}
        prompts = None
        if attempt.prompts_file is not None and attempt.prompts_file.is_file():
            prompts = (attempt.prompts_file.name, attempt.prompts_file.read_bytes())
        return Shipped(attempt, files, prompts)
    finally:
        shutil.rmtree(cell_dir, ignore_errors=True)


@dataclass
class RunningCell:
    cell: Cell
    holder: str
    tries: list[dict[str, Any]]


class RayExecutor:
    """Cells across the Ray cluster at `address` (None: RAY_ADDRESS, else a local one started for the run)."""

    def __init__(self, address: str | None = None, max_parallel: int | None = None, max_retries: int = 1):
        self.address, self.max_parallel, self.max_retries = address, max_parallel, max_retries
        self.locks = None
        self.holders: dict[str, Cell] = {}

    def running(self) -> dict[str, str]:
        """Cell id → Ray node id of each cell running now."""
        import ray

        if self.locks is None:
            return {}
        return {self.holders[h].id: n for h, n in ray.get(self.locks.running.remote()).items() if h in self.holders}

    def options(self, backend: BackendSpec, tries: list[dict[str, Any]]) -> dict[str, Any]:
        from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy, NotIn

        opts = placement_options(backend.placement) | {"max_retries": 0}  # retried here, elsewhere
        tried = sorted({t["ray_node_id"] for t in tries if t.get("ray_node_id")})
        if tried:  # preferred, not required: with no other node that fits, the same one is tried again
            opts["scheduling_strategy"] = NodeLabelSchedulingStrategy({}, soft={"ray.io/node-id": NotIn(*tried)})
        return opts

    def results(self, runner: Runner, cells: list[Cell], progress: Progress) -> Iterator[CellResult]:
        ray = import_ray()
        connected = connect(ray, self.address)
        task = ray.remote(run_on_node)
        # On the head node (Ray's own marker resource): the locks outlive any worker node that dies.
        self.locks = ray.remote(NodeLocks).options(num_cpus=0, resources={HEAD_NODE: 0.001}).remote()
        queue: deque[tuple[Cell, list[dict[str, Any]]]] = deque((c, []) for c in cells)
        masked = runner.redact(runner.scenario.model_dump(mode="json"))
        pending: dict[Any, RunningCell] = {}
        try:
            while queue or pending:
                while queue and (self.max_parallel is None or len(pending) < self.max_parallel):
                    cell, tries = queue.popleft()
                    holder = uuid.uuid4().hex
                    self.holders[holder] = cell
                    ref = task.options(**self.options(runner.scenario.backend(cell.backend), tries)).remote(
                        masked, cell, holder, self.locks)
                    pending[ref] = RunningCell(cell, holder, tries)
                runner.in_flight = [f.cell for f in pending.values()]
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0)
                if not done:
                    time.sleep(POLL_S)
                for ref in done:
                    flight = pending.pop(ref)
                    result = self.finish(ray, runner, ref, flight)
                    self.locks.release.remote(flight.holder)
                    runner.in_flight = [f.cell for f in pending.values()]
                    if result.ok or len(flight.tries) > self.max_retries:
                        yield result
                    else:
                        runner.console.print(f"retrying {flight.cell.id} (try {len(flight.tries) + 1} of "
                                             f"{self.max_retries + 1}): {runner.redact(result.error_line)}",
                                             highlight=False, markup=False)
                        queue.append((flight.cell, flight.tries))
        except SystemError as e:
            # Ctrl-C's Interrupted, raised by the signal handler while Ray's C++ code ran, surfaces wrapped in this.
            cause = e.__cause__ or e.__context__
            if isinstance(cause, Interrupted):
                raise cause from None
            raise
        finally:
            if pending:  # interrupted
                # First KeyboardInterrupt in each task: run_worker stops its worker, which stops its servers. Ray
                # kills a task's children with it, so a forced cancel alone would leave the servers (sessions of
                # their own) running.
                for ref in pending:
                    ray.cancel(ref)
                _, stuck = ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_GRACE_S)
                # Only the tasks still running: cancelling a finished one trips a check inside Ray (task_manager.cc
                # "it != submissible_tasks_.end()") that aborts this process, and the run's exit code with it.
                for ref in stuck:
                    ray.cancel(ref, force=True)
            ray.kill(self.locks)
            self.locks = None
            if connected:
                ray.shutdown()

    def finish(self, ray, runner: Runner, ref, flight: RunningCell) -> CellResult:
        cell = flight.cell
        try:
            shipped: Shipped = ray.get(ref)
        except ray.exceptions.RayError as e:  # the node died, the task's worker was killed, ...
            node_id = ray.get(self.locks.node_of.remote(flight.holder))
            why = f"its Ray task failed{f' on node {node_id}' if node_id else ''}: {describe(e).splitlines()[0]}"
            result = runner.failed(cell, why)
            flight.tries.append({"ray_node_id": node_id, "status": "failed", "error": why})
        else:
            cell_dir = runner.store.fresh_cell_dir(cell.id)
            for name, data in shipped.files.items():
                (cell_dir / name).parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cell_dir / name, data)
            if shipped.prompts is not None:
                path = runner.out / "prompts" / shipped.prompts[0]
                if not path.is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, shipped.prompts[1])
            result = runner.collect(cell, cell_dir, shipped.attempt)
            flight.tries.append({**shipped.attempt.node, "status": result.status, "error": result.error_line})
        return result.model_copy(update={"attempts": [NodeAttempt.model_validate(t) for t in flight.tries]})
