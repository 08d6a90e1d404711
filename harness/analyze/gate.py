"""`bench gate`: compare a run with a baseline, cell by cell and metric by metric (docs/gate.md).

A metric regresses only when the current run is beyond the policy's threshold AND significantly so: the one-sided
test asks whether the current samples exceed `threshold × baseline`, not merely the baseline, so noise alone (or a
small real change the policy tolerates) never fails a build. A cell whose repetitions disagree while other processes
kept the machine busy is not judged: the gate says the machine was busy, and with `on_unstable: rerun N` it runs that
cell again (`bench run --rerun`), the one time it runs an engine; otherwise a pure function of results files.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from scipy.stats import mannwhitneyu

from harness.analyze.baselines import META_FILE
from harness.config.load import format_validation_error, load_yaml_file
from harness.core.files import atomic_write
from harness.core.spec import Strict
from harness.records import CellResult, RequestRecord, ResultsError, load_run, read_requests
from harness.results.catalogue import PER_REQUEST, gate_metric_names, verdict_name
from harness.results.markdown import md_escape, md_table
from harness.results.runs import run_folder

DEFAULT_POLICY = Path(__file__).with_name("gate_policy.yaml")

PER_REPETITION = gate_metric_names()


class GateError(ResultsError):
    """Runs that cannot be compared, or a bad policy file: one message, exit code 2."""


# ---- policy -------------------------------------------------------------------------------------------------------

class MetricRule(Strict):
    direction: Literal["lower", "higher"] = Field(description="which way is better")
    threshold: float = Field(gt=0, description="tolerated current/baseline ratio: the most for lower (e.g. 1.10), "
                                               "the least for higher (e.g. 0.90)")
    samples: Literal["per_request", "per_repetition"] | None = Field(
        None, description="default: per_request for a metric with one sample per request (ttft_ms, tpot_ms, "
                          "e2el_ms, ...), else per_repetition")
    test: Literal["mann_whitney", "bootstrap_median_ci"] = "mann_whitney"
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of the one-sided test")
    min_samples: int = Field(5, ge=2, description="fewer samples on either side: inconclusive")
    inconclusive: Literal["pass", "fail"] | None = Field(None, description="default: the policy's `inconclusive`")

    @model_validator(mode="after")
    def _threshold_side(self) -> MetricRule:
        if self.direction == "lower" and self.threshold < 1:
            raise ValueError(f"with direction lower the threshold is the largest tolerated ratio current/baseline, "
                             f"so >= 1 (e.g. 1.10); got {self.threshold}")
        if self.direction == "higher" and self.threshold > 1:
            raise ValueError(f"with direction higher the threshold is the smallest tolerated ratio current/baseline, "
                             f"so <= 1 (e.g. 0.90); got {self.threshold}")
        return self


class Bootstrap(Strict):
    resamples: int = Field(2000, ge=100)
    seed: int = 0


class EnvironmentPolicy(Strict):
    versions: Literal["exact", "major.minor", "major"] = Field(
        "major.minor", description="how much of a version number must match (engines, packages, GPU driver, CUDA)")
    on_difference: dict[str, Literal["refuse", "warn", "pass"]] = Field(
        default_factory=dict, description="difference name pattern (fnmatch, e.g. 'engine.*.torch', 'cpu.*') → "
                                          "what it does; the first match wins; unmatched ones refuse, except that "
                                          "cpu.* only warns with a reference backend")


class Policy(Strict):
    reference: str | None = Field(None, description="normalize every metric by this backend's, same run, model, workload")
    environment: EnvironmentPolicy = Field(default_factory=EnvironmentPolicy)
    inconclusive: Literal["pass", "fail"] = "pass"
    on_unstable: str = Field("inconclusive", pattern=r"^(rerun [1-9][0-9]*|fail|inconclusive)$", description=(
        "a current cell whose repetitions disagree while other processes kept the machine busy (busy_cpu_percent): "
        "`rerun N` runs it again, up to N times, into the current results (bench run --rerun) and judges the first "
        "run that is not both; `inconclusive` judges none of its metrics and says the machine was busy (the build "
        "then goes as `inconclusive` says); `fail` fails the build, saying the same"))
    busy_cpu_percent: float = Field(25.0, gt=0, description="other processes' CPU use (% of one core, averaged over a "
                                                            "repetition, hypervisor steal included) from which the "
                                                            "machine counts as busy")
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    metrics: dict[str, MetricRule] = Field(min_length=1)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, metrics: dict[str, MetricRule]) -> dict[str, MetricRule]:
        for name, rule in metrics.items():
            rule.samples = rule.samples or ("per_request" if name in PER_REQUEST else "per_repetition")
            if rule.samples == "per_request" and name not in PER_REQUEST:
                raise ValueError(f"{name!r} has no per-request samples; those are {', '.join(PER_REQUEST)} "
                                 f"(gate itl and the rest per repetition, e.g. itl_ms.p50)")
            if rule.samples == "per_repetition" and name not in PER_REPETITION:
                raise ValueError(f"unknown metric {name!r}; per repetition: a scalar such as output_throughput_tok_s "
                                 f"or request_throughput_rps, or DISTRIBUTION.STAT such as ttft_ms.p50")
        return metrics

    def on_inconclusive(self, metric: str) -> str:
        return self.metrics[metric].inconclusive or self.inconclusive

    @property
    def reruns(self) -> int:
        return int(self.on_unstable.split()[1]) if self.on_unstable.startswith("rerun") else 0


def load_policy(path: Path | None) -> Policy:
    source = path or DEFAULT_POLICY
    data = load_yaml_file(source, "policy", GateError)  # the scenario's limits: size, aliases, depth, UTF-8
    if not isinstance(data, dict):
        raise GateError(f"{source}: expected a mapping with `metrics` (and optionally reference, inconclusive, "
                        f"bootstrap), got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        lines = format_validation_error(str(source), e).splitlines()
        raise GateError("\n".join([f"{source}: invalid gate policy", *lines[1:]])) from None


# ---- runs and their samples ---------------------------------------------------------------------------------------

CellKey = tuple[str, str, str]  # model, backend, workload


class GateRun:
    """One results file, and the folder its per-cell requests files are relative to."""

    def __init__(self, path: Path):
        self.result = load_run(path)
        self.folder = run_folder(path)
        self.cells: dict[CellKey, CellResult] = {(c.model, c.backend, c.workload): c for c in self.result.cells}
        meta = self.folder / META_FILE
        try:
            self.baseline_meta = json.loads(meta.read_text()) if meta.is_file() else None
        except json.JSONDecodeError as e:
            raise GateError(f"{meta}: not valid JSON: {e}") from None
        self._records: dict[str, list[RequestRecord]] = {}

    def records(self, cell: CellResult) -> list[RequestRecord]:
        if cell.id not in self._records:
            path = cell.requests_path(self.folder)
            try:
                self._records[cell.id] = read_requests(path)
            except FileNotFoundError:
                raise GateError(f"{path}: missing; per-request metrics need every cell's requests file next to "
                                f"results.json (`bench baseline update` stores them with a baseline)") from None
        return self._records[cell.id]

    def samples(self, cell: CellResult, metric: str, rule: MetricRule) -> np.ndarray:
        """The metric's samples in the cell: one per completed request (the catalogue's extractor), or one per
        repetition."""
        if rule.samples == "per_request":
            return np.array(PER_REQUEST[metric].samples(self.records(cell)), dtype=float)
        values = [rep.value(metric) for rep in cell.repetitions]
        return np.array([v for v in values if v is not None], dtype=float)


# ---- environment guard --------------------------------------------------------------------------------------------

@dataclass
class EnvDifference:
    name: str  # e.g. gpu.devices, cpu.model, packages.torch, engine.hf.transformers: what a policy pattern matches
    baseline: Any
    current: Any
    action: Literal["refuse", "warn", "pass"] = "refuse"

    def __str__(self) -> str:
        a, b = self.baseline, self.current
        if isinstance(a, str) and isinstance(b, str) and "\n" in a + b:
            # A block of text (an engine's plan): its first differing line says what changed.
            pairs = list(itertools.zip_longest(a.splitlines(), b.splitlines(), fillvalue=""))
            i, (a, b) = next((i, p) for i, p in enumerate(pairs) if p[0] != p[1])
            return f"{self.name}, line {i + 1}: {a!r:.200} (baseline) vs {b!r:.200} (current)"
        return f"{self.name}: {a!r:.200} (baseline) vs {b!r:.200} (current)"


# Engine settings that say where or when, not how fast: a launched server's port, files inside --out, process ids,
# times. Matched against every part of a key's path, lower-cased.
INCIDENTAL_KEY = re.compile(r"^(url|host|port|pid|pgid|path|dir|log|hostname|created|started|updated|timestamp)$"
                            r"|_(url|port|pid|path|dir|file|log|time|at)$|^(log|time)_")
# Inside a value: URLs, file paths (a plan's text names its offload folder inside --out), ISO times.
INCIDENTAL_TEXT = [(re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I), "<url>"),
                   (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?([+-]\d\d:?\d\d|Z)?"), "<time>"),
                   (re.compile(r"(?:~|\.{1,2})?(?:/[\w.@+-]+)+/?|(?:[\w.@+-]+/)+[\w.@+-]*"), "<path>")]
VERSION = re.compile(r"^v?(\d+)((?:\.\d+)*)([.+-][0-9A-Za-z.+-]*)?$")


def comparable(v: Any, versions: str) -> Any:
    """The part of a value that changes performance: versions cut to `versions`, paths, URLs and times blanked."""
    if not isinstance(v, str):
        return v
    m = VERSION.match(v.strip())
    if m and m.group(2):
        parts = [m.group(1), *m.group(2).lstrip(".").split(".")]
        keep = {"exact": len(parts), "major.minor": 2, "major": 1}[versions]
        return ".".join(parts[:keep]) if versions != "exact" else v.strip()
    for pattern, placeholder in INCIDENTAL_TEXT:
        v = pattern.sub(placeholder, v)
    return v


def _settings(d: Any, prefix: str = "") -> dict[str, Any]:
    """An engine block flattened to dotted keys, without incidental keys."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if INCIDENTAL_KEY.search(str(k).lower()):
            continue
        out.update(_settings(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def environment_differences(base: GateRun, cur: GateRun, keys: list[CellKey], policy: Policy) -> list[EnvDifference]:
    """What could make two runs' numbers incomparable: the GPUs, their driver and CUDA, the CPU, package versions
    both runs have, and each backend's engine block (versions and settings; not ports, paths, PIDs or times)."""
    eb, ec = base.result.environment, cur.result.environment
    versions = policy.environment.versions
    diffs: list[EnvDifference] = []

    def compare(name: str, a: Any, b: Any) -> None:
        if comparable(a, versions) != comparable(b, versions):
            diffs.append(EnvDifference(name, a, b))

    def gpu_names(env: dict[str, Any]) -> list[Any]:
        return [d.get("name") for d in (env.get("gpu") or {}).get("devices") or []]

    compare("gpu.devices", gpu_names(eb), gpu_names(ec))
    for k in ("driver", "cuda_driver"):
        compare(f"gpu.{k}", (eb.get("gpu") or {}).get(k), (ec.get("gpu") or {}).get(k))
    # The instruction set beside the model name: one name can hide different extensions (and engine paths).
    for k in ("model", "isa", "logical_cores"):
        compare(f"cpu.{k}", (eb.get("cpu") or {}).get(k), (ec.get("cpu") or {}).get(k))
    # A package one run lacks is one no backend of it used (a backend that needs it fails without it).
    pb, pc = eb.get("packages") or {}, ec.get("packages") or {}
    for k in sorted(pb.keys() & pc.keys()):
        compare(f"packages.{k}", pb[k], pc[k])
    seen = set()
    for key in keys:
        backend = key[1]
        sb, sc = (_settings(run.cells[key].engine.model_dump()) for run in (base, cur))
        for k in sorted(sb.keys() | sc.keys()):
            name = f"engine.{backend}.{k}"
            if name not in seen:  # every cell of a backend reports the same engine
                seen.add(name)
                compare(name, sb.get(k), sc.get(k))
    for d in diffs:
        d.action = next((action for pattern, action in policy.environment.on_difference.items()
                         if fnmatch.fnmatchcase(d.name, pattern)), default_action(d, policy))
    return diffs


def default_action(d: EnvDifference, policy: Policy) -> Literal["refuse", "warn"]:
    # With a reference, both numbers of every ratio come from one machine, so a different CPU model or core count
    # (a shared runner pool) cancels to first order; a different GPU or engine version does not (docs/gate.md).
    if policy.reference is not None and d.name.startswith("cpu."):
        return "warn"
    # A setting one run's llmbench did not record says how the harness changed, not the engine.
    if (d.name.startswith("engine.") or d.name == "cpu.isa") and (d.baseline is None or d.current is None):
        return "warn"
    return "refuse"


# ---- a busy machine -----------------------------------------------------------------------------------------------

def busy_machine(cell: CellResult | None, policy: Policy) -> str | None:
    """Why the cell's numbers say more about the machine than the code: its repetitions disagree (unstable) while
    other processes used at least busy_cpu_percent of a core in one of them (the resource monitor's measure)."""
    if cell is None or not cell.ok or not cell.unstable:
        return None
    resources = cell.resources
    spans = [*resources.repetitions, resources.whole] if resources else []
    loads = [(b.other_cpu_percent or 0) + (b.steal_percent or 0) for b in spans if b is not None]
    worst = max(loads, default=0)
    if worst < policy.busy_cpu_percent:
        return None
    return f"{cell.id} is unstable while other processes used up to {worst:.0f}% of a core"


# ---- the statistics -----------------------------------------------------------------------------------------------

@dataclass
class GateCheck:
    cell: str
    metric: str
    baseline: float | None = None
    current: float | None = None
    ratio: float | None = None
    threshold: float | None = None
    test: str | None = None
    p_value: float | None = None
    ci_baseline: list[float] | None = None
    ci_current: list[float] | None = None
    n_baseline: int = 0
    n_current: int = 0
    verdict: Literal["pass", "regression", "improvement", "inconclusive", "busy"] = "pass"
    fails_build: bool = False
    note: str = ""


def _bootstrap_ci(x: np.ndarray, ref: np.ndarray | None, alpha: float, boot: Bootstrap) -> list[float]:
    """Percentile CI of median(x), or of median(x) / median(ref) resampling both, so the reference's noise counts."""
    rng = np.random.default_rng(boot.seed)
    stat = np.median(rng.choice(x, (boot.resamples, x.size)), axis=1)
    if ref is not None:
        stat = stat / np.median(rng.choice(ref, (boot.resamples, ref.size)), axis=1)
    lo, hi = np.percentile(stat, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def judge(rule: MetricRule, base: np.ndarray, cur: np.ndarray, base_ref: np.ndarray | None,
          cur_ref: np.ndarray | None, boot: Bootstrap) -> dict[str, Any]:
    """Compare one metric's samples; refs are the reference cell's samples of the same metric in each run."""
    out: dict[str, Any] = {"threshold": rule.threshold, "test": rule.test, "n_baseline": int(base.size),
                           "n_current": int(cur.size)}
    if min(base.size, cur.size) < rule.min_samples:
        return {**out, "verdict": "inconclusive",
                "note": f"{min(base.size, cur.size)} sample(s) < min_samples {rule.min_samples}"}
    for ref, run in ((base_ref, "baseline"), (cur_ref, "current")):
        if ref is not None and ref.size < rule.min_samples:
            return {**out, "verdict": "inconclusive", "note": f"the reference cell has {ref.size} sample(s) < "
                                                              f"min_samples {rule.min_samples} in the {run} run"}
        if ref is not None and np.median(ref) <= 0:
            return {**out, "verdict": "inconclusive", "note": f"the reference's median is 0 in the {run} run"}
    b = base / np.median(base_ref) if base_ref is not None else base
    c = cur / np.median(cur_ref) if cur_ref is not None else cur
    out["baseline"], out["current"] = float(np.median(b)), float(np.median(c))
    if out["baseline"] <= 0:
        return {**out, "verdict": "inconclusive", "note": "the baseline median is 0: no ratio"}
    ratio = out["current"] / out["baseline"]
    out["ratio"] = ratio
    # The (1 - alpha) CIs of both medians: shown in the table, and what bootstrap_median_ci decides on.
    cb = _bootstrap_ci(base, base_ref, rule.alpha, boot)
    cc = _bootstrap_ci(cur, cur_ref, rule.alpha, boot)
    out["ci_baseline"], out["ci_current"] = cb, cc
    lower = rule.direction == "lower"
    worse = ratio > 1 if lower else ratio < 1
    # Test against the tolerance bound, not the baseline: "significantly beyond threshold × baseline".
    bound = rule.threshold if worse else 1 / rule.threshold
    above = lower == worse  # is the side being tested "current above the bound"?
    beyond = ratio > bound if above else ratio < bound
    if rule.test == "mann_whitney":
        smallest_p = 1 / math.comb(base.size + cur.size, base.size)
        if smallest_p >= rule.alpha:
            return {**out, "verdict": "inconclusive",
                    "note": f"with {base.size} and {cur.size} samples the smallest attainable p is "
                            f"{smallest_p:.3g} >= alpha {rule.alpha}"}
        p = float(mannwhitneyu(c, b * bound, alternative="greater" if above else "less").pvalue)
        out["p_value"], significant = p, p < rule.alpha
    else:
        significant = cc[0] > bound * cb[1] if above else cc[1] < bound * cb[0]
    if beyond and significant:
        return {**out, "verdict": "regression" if worse else "improvement"}
    if beyond and worse:
        # CIs that do not overlap are a difference beyond noise: what falls short is the tolerance, not the evidence.
        apart = cc[0] > cb[1] if lower else cc[1] < cb[0]
        why = (f"worse than the baseline beyond noise (their CIs do not overlap), but not significantly beyond the "
               f"{abs(rule.threshold - 1):.0%} the policy tolerates" if apart else "but not significantly")
        return {**out, "verdict": "inconclusive", "note": f"beyond the threshold, {why}"}
    return {**out, "verdict": "pass"}


# ---- the gate -----------------------------------------------------------------------------------------------------

@dataclass
class GateReport:
    baseline: str
    current: str
    reference: str | None
    verdict: Literal["pass", "fail", "busy"] = "pass"
    exit_code: int = 0
    rows: list[GateCheck] = field(default_factory=list)
    environment_differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    baseline_meta: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def compare(base: GateRun, cur: GateRun, policy: Policy, allow_env_change: bool = False) -> GateReport:
    """The whole comparison; raises GateError when the runs cannot be compared."""
    report = GateReport(str(base.folder), str(cur.folder), policy.reference, baseline_meta=base.baseline_meta)
    keys = [k for k in cur.cells if k in base.cells]
    if not keys:
        raise GateError(f"no matching cells (same model, backend and workload): the baseline has "
                        f"{', '.join(c.id for c in base.cells.values()) or 'none'}; the current run has "
                        f"{', '.join(c.id for c in cur.cells.values()) or 'none'}")
    ref = policy.reference
    for run, name in ((base, "baseline"), (cur, "current")):
        if ref is not None and all(k[1] != ref for k in run.cells):
            raise GateError(f"reference backend {ref!r} is not in the {name} run ({run.folder}); its backends: "
                            f"{', '.join(sorted({k[1] for k in run.cells}))}")

    diffs = environment_differences(base, cur, keys, policy)
    blocking = [d for d in diffs if d.action == "refuse"]
    if blocking and not allow_env_change:
        raise GateError("the runs were measured in different environments, so their numbers are not comparable:\n"
                        + "\n".join(f"  {d}" for d in blocking)
                        + "\nstore a new baseline on this machine (`bench baseline update`), let the policy's "
                          "environment.on_difference warn on or pass such a difference, or pass --allow-env-change "
                          "to compare anyway")
    report.environment_differences = [str(d) for d in diffs if d.action != "pass"]

    for key in keys:
        b_cell, c_cell = base.cells[key], cur.cells[key]
        if not b_cell.ok:
            report.notes.append(f"{c_cell.id}: not compared, the baseline cell {b_cell.status}")
            continue
        if not c_cell.ok:
            report.rows.append(GateCheck(c_cell.id, "status", verdict="regression", fails_build=True,
                                   note=f"ok in the baseline, {c_cell.status} now: {c_cell.error_line or ''}"))
            continue
        if ref is not None and key[1] == ref:
            report.notes.append(f"{c_cell.id}: the reference backend, not gated against itself (only a failure counts)")
            continue
        ref_cells = [run.cells.get((key[0], ref, key[2])) for run in (base, cur)] if ref is not None else [None, None]
        unstable = ", ".join(f"unstable in the {name}" for name, c in (("baseline", b_cell), ("current", c_cell))
                             if c.unstable)
        report.notes += [f"{c.id} is unstable in the {name} run: {c.unstable}"
                         for name, c in (("baseline", b_cell), ("current", c_cell)) if c.unstable]
        missing = ref is not None and any(rc is None or not rc.ok for rc in ref_cells)
        # A cell (or the reference it is divided by) unstable on a busy machine measured the machine: not judged.
        if busy := busy_machine(c_cell, policy) or busy_machine(ref_cells[1], policy):
            report.rows += [GateCheck(c_cell.id, metric, threshold=rule.threshold, test=rule.test, verdict="busy",
                                fails_build=policy.on_unstable == "fail" or policy.on_inconclusive(metric) == "fail",
                                note=f"not judged, the machine was busy: {busy}")
                            for metric, rule in policy.metrics.items()]
            continue
        # Where either run's client fell behind beyond noise, both are judged on latency from the scheduled send.
        shifted = bool(b_cell.client_queue_shift or c_cell.client_queue_shift)
        for metric, rule in policy.metrics.items():
            basis = verdict_name(metric, shifted)
            if missing:
                row = GateCheck(c_cell.id, metric, threshold=rule.threshold, test=rule.test, verdict="inconclusive",
                          note=f"no ok reference cell {key[0]}/{ref}/{key[2]} in both runs")
            else:
                base_ref, cur_ref = (run.samples(rc, basis, rule) if rc else None
                                     for run, rc in zip((base, cur), ref_cells))
                row = GateCheck(c_cell.id, metric, **judge(rule, base.samples(b_cell, basis, rule),
                                                        cur.samples(c_cell, basis, rule), base_ref, cur_ref,
                                                        policy.bootstrap))
            if basis != metric:
                row.note = "; ".join(filter(None, [row.note, f"judged as {basis}: the client's own queue moved the "
                                                             f"latency beyond noise"]))
            row.fails_build = row.verdict == "regression" or (
                row.verdict == "inconclusive" and policy.on_inconclusive(metric) == "fail")
            if unstable:
                row.note = "; ".join(filter(None, [row.note, unstable]))
            report.rows.append(row)
    report.notes += [f"{c.id}: in the baseline only, not compared" for k, c in base.cells.items() if k not in cur.cells]
    report.notes += [f"{c.id}: new, no baseline to compare with" for k, c in cur.cells.items() if k not in base.cells]
    if not report.rows:
        raise GateError("nothing to compare: " + "; ".join(report.notes))
    if any(r.fails_build for r in report.rows):
        report.verdict, report.exit_code = "fail", 1
    if any(r.verdict == "busy" for r in report.rows) and not any(r.verdict == "regression" for r in report.rows):
        report.verdict = "busy"  # what it says, whatever the build does (policy: on_unstable, inconclusive)
    return report


# ---- output -------------------------------------------------------------------------------------------------------

HEADERS = ["cell", "metric", "baseline (CI)", "current (CI)", "change", "threshold", "p", "verdict", "note"]


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def _with_ci(v: float | None, ci: list[float] | None) -> str:
    return _num(v) + (f" [{_num(ci[0])}–{_num(ci[1])}]" if v is not None and ci else "")


def _cells(r: GateCheck) -> list[str]:
    change = "–" if r.ratio is None else f"{(r.ratio - 1) * 100:+.1f}%"
    threshold = "–" if r.threshold is None else f"{(r.threshold - 1) * 100:+.0f}%"
    p = "–" if r.p_value is None else f"{r.p_value:.3g}"
    return [r.cell, r.metric, _with_ci(r.baseline, r.ci_baseline), _with_ci(r.current, r.ci_current), change,
            threshold, p, r.verdict, r.note]


def _headline(report: GateReport) -> str:
    counts = {v: sum(r.verdict == v for r in report.rows)
              for v in ("regression", "busy", "inconclusive", "improvement", "pass")}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    if report.verdict == "busy":
        cells = sorted({r.cell for r in report.rows if r.verdict == "busy"})
        return (f"gate: the machine was busy, not a regression: {', '.join(cells)} not judged "
                f"({'the build fails' if report.exit_code else 'the build passes'}); {summary}")
    return f"gate {report.verdict.upper()}: {summary}"


def _preamble(report: GateReport) -> list[str]:
    lines = [f"baseline: {report.baseline}", f"current: {report.current}"]
    meta = report.baseline_meta
    if meta:
        lines.append(f"baseline {meta.get('name')!r} stored {meta.get('stored')} at git {meta.get('git_sha')} "
                     f"from {meta.get('source')}")
    if report.reference:
        lines.append(f"values are ratios to backend {report.reference!r} in the same run (same model and workload)")
    lines.append("values are medians with their bootstrap CI at the metric's 1 - alpha (95% at alpha 0.05); change "
                 "is current / baseline - 1; threshold is the change the policy tolerates")
    return lines


VERDICT_STYLE = {"regression": "bold red", "busy": "yellow", "inconclusive": "yellow", "improvement": "green",
                 "pass": ""}


def print_report(report: GateReport, console: Console) -> None:
    for line in _preamble(report):
        console.print(line, highlight=False, markup=False)
    table = Table(title="bench gate")
    for h in HEADERS:
        table.add_column(h, justify="right" if h in ("change", "threshold", "p") else "left")
    for r in report.rows:
        table.add_row(*map(Text, _cells(r)), style=VERDICT_STYLE[r.verdict] or None)
    console.print(table)
    for d in report.environment_differences:
        console.print(f"[yellow]warning:[/yellow] environment changed: {escape(d)}", highlight=False)
    for n in report.notes:
        console.print(f"note: {n}", highlight=False, markup=False)
    console.print(_headline(report), style="bold red" if report.exit_code else "bold green", highlight=False)


def to_markdown(report: GateReport) -> str:
    lines = [f"# {_headline(report)}", "", *(f"- {md_escape(line)}" for line in _preamble(report)), "",
             *md_table(HEADERS, [_cells(r) for r in report.rows])]
    if report.environment_differences:
        lines += ["", "## Environment differences (compared anyway)", "",
                  *(f"- {md_escape(d)}" for d in report.environment_differences)]
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {md_escape(n)}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def run_gate(baseline: Path, current: Path, policy_file: Path | None = None, allow_env_change: bool = False,
             reference: str | None = None, out: Path | None = None, console: Console | None = None) -> int:
    """`bench gate`: exit code 0 pass, 1 regression (raises GateError, exit 2, when the runs are incomparable)."""
    policy = load_policy(policy_file)
    if reference is not None:
        policy.reference = reference
    base, cur = GateRun(baseline), GateRun(current)
    report = compare(base, cur, policy, allow_env_change)
    console = console or Console(width=200)
    for attempt in range(1, policy.reruns + 1):
        busy = sorted({r.cell for r in report.rows if r.verdict == "busy"})
        if not busy:
            break
        why = rerun(cur, busy, console)
        if why is not None:
            report.notes.append(f"on_unstable {policy.on_unstable}: cannot re-run {', '.join(busy)}: {why}")
            break
        cur = GateRun(current)
        report = compare(base, cur, policy, allow_env_change)
        report.notes.append(f"on_unstable {policy.on_unstable}: re-ran {', '.join(busy)} (re-run {attempt} of "
                            f"{policy.reruns}) because the machine was busy")
    out = out or cur.folder
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "gate.json", report.to_json())
    atomic_write(out / "gate.md", to_markdown(report))
    print_report(report, console)
    return report.exit_code


def rerun(cur: GateRun, cell_ids: list[str], console: Console) -> str | None:
    """Run the cells again into the current results (`bench run SCENARIO --out CURRENT --rerun ID...`, whose other
    cells stay); None when it ran, else why it could not."""
    scenario = Path(cur.result.scenario_file or "")
    if not scenario.is_file():
        return f"its scenario file {str(scenario)!r} (results.json's scenario_file) is not found from here"
    argv = [sys.executable, "-m", "harness.cli", "run", str(scenario), "--out", str(cur.folder)]
    for cell in cell_ids:
        argv += ["--rerun", cell]
    console.print(f"the machine was busy: re-running {', '.join(cell_ids)}", highlight=False, markup=False)
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: a cell failed, which the gate judges
        return f"bench run exited {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"
    return None
