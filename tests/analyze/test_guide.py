"""`bench guide`: rankings, the numbers behind a recommendation, flips along sweeps, and what was not measured."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from harness.cli import app
from harness.analyze.guide import RulesError, build_guide, load_rules, normalized, write_guide
from harness.results.catalogue import RANKED, fmt_value
from harness.results.runs import load_runs
from harness.config.scenario import SLO
from tests.report_fixtures import ResultsBuilder, environment, hacked, resources, swept_gpu_results, workload

pytest_plugins = ["tests.report_fixtures"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    return swept_gpu_results(tmp_path_factory.mktemp("swept") / "sweeps")


@pytest.fixture(scope="module")
def guide(swept):
    return {u.id: u for u in build_guide(load_runs([swept]), load_rules()).use_cases}


def test_normalization():
    assert normalized({"a": 10.0, "b": 5.0}, "higher") == {"a": 1.0, "b": 0.5}
    assert normalized({"a": 10.0, "b": 5.0}, "lower") == {"a": 0.5, "b": 1.0}
    assert normalized({"a": 0.0, "b": 0.0}, "lower") == {"a": 1.0, "b": 1.0}
    # Below the metric's resolution, values are equal.
    assert normalized({"a": 1e-9, "b": 4e-9}, "lower", floor=1e-3) == {"a": 1.0, "b": 1.0}


def test_ranking_matches_the_documented_score(swept, guide):
    """Recompute chat-serving's ranking from results.json with the formula in SCORING."""
    u = next(u for u in load_rules() if u.id == "chat-serving")
    cells = json.loads((swept / "results.json").read_text())["cells"]
    by_workload = defaultdict(dict)
    for c in cells:
        if c["workload"].startswith("chat"):
            by_workload[c["workload"]][c["backend"]] = c["metrics"]
    get = {"output_throughput_tok_s": lambda m: m["output_throughput_tok_s"],
           "goodput_rps": lambda m: m["goodput_rps"], "ttft_ms.p99": lambda m: m["ttft_ms"]["p99"]}
    scores = defaultdict(list)
    for per_backend in by_workload.values():
        total = defaultdict(float)
        for metric, w in u.weights.items():
            vals = {b: get[metric](m) for b, m in per_backend.items()}
            best = max(vals.values()) if RANKED[metric].better == "higher" else min(vals.values())
            for b, v in vals.items():
                total[b] += w * (v / best if RANKED[metric].better == "higher" else best / v)
        for b, t in total.items():
            scores[b].append(t / sum(u.weights.values()))
    expected = sorted(((sum(s) / len(s), b) for b, s in scores.items()), reverse=True)

    ranking = guide["chat-serving"].ranking
    assert [r.values[1] for r in ranking.rows] == [b for _, b in expected] == ["batcher", "fastgpu"]
    for row, (score, _) in zip(ranking.rows, expected):
        assert float(row.values[2]) == pytest.approx(score, abs=1e-3)


def test_recommendation_states_its_numbers(swept, guide):
    chat = guide["chat-serving"]
    assert chat.recommendation.startswith("batcher:")
    cells = {c["id"]: c for c in json.loads((swept / "results.json").read_text())["cells"]}
    evidence = " ".join(chat.evidence)
    cited = [cid for cid in cells if f"cell {cid}," in evidence]
    assert cited, "the evidence names no cell"
    for cid in cited:
        assert fmt_value(cells[cid]["metrics"]["output_throughput_tok_s"], "tok/s") in evidence


def test_flips_from_sweeps(guide):
    flips = " ".join(guide["chat-serving"].flips)
    assert "chat: at load.concurrency ≥ 4, batcher overtakes fastgpu" in flips
    long_doc = " ".join(guide["long-document-8gb"].flips)
    assert "long: at input_tokens ≥ 32768, only offload fits" in long_doc
    assert "peak VRAM 9.50 GiB > 8.00 GiB" in long_doc and "m__fastgpu__long_input_tokens_32768_" in long_doc
    # Below 32k the faster backend still ranks first, and the recommendation says where it does not fit.
    assert guide["long-document-8gb"].recommendation.startswith("fastgpu:")
    assert "It does not fit on 1 of them" in guide["long-document-8gb"].recommendation
    excluded = guide["long-document-8gb"].excluded
    assert any("fastgpu at long[input_tokens=32768]: peak VRAM 9.50 GiB" in e for e in excluded)
    # No change along a sweep is said as such.
    assert any("leads at every input_tokens measured" in f for f in guide["offline-batch"].flips)


def test_not_measured_is_listed(guide):
    for case in ("cpu-chat", "cpu-long-document"):
        cpu = guide[case]
        assert cpu.recommendation.startswith("No recommendation") and not cpu.ranking.rows
        assert not cpu.recommended
        assert any("no cell ran on a CPU" in n for n in cpu.not_measured)
    assert any("no sweep over load.rate" in n for n in guide["chat-serving"].not_measured)


def test_missing_metrics_and_constraints_that_cannot_be_checked(tmp_path):
    b = ResultsBuilder(tmp_path / "r", env=environment(gpu="Test GPU"), slo=SLO())  # no SLO: no goodput
    w = workload("chat", input_tokens=16384, concurrency=4)
    b.add("a", w, 0.05, 0.01, device="cuda:0", resources=resources(None))
    b.add("b", w, 0.05, 0.02, device="cuda:0", failed="RuntimeError: CUDA out of memory\ndetails")
    guide = {u.id: u for u in build_guide(load_runs([b.write()]), load_rules()).use_cases}

    chat = guide["chat-serving"]
    assert any(n.startswith("goodput req/s at chat: not measured for a") for n in chat.not_measured)
    assert any("b at chat: failed: RuntimeError: CUDA out of memory" in e for e in chat.excluded)
    assert chat.recommendation.startswith("a:")
    long_doc = guide["long-document-8gb"]
    assert long_doc.recommendation.startswith("No recommendation: no measured backend meets")
    assert any("cannot check peak VRAM ≤ 8.00 GiB: peak VRAM not measured (NVML: NVML Shared Library Not Found)" in e
               for e in long_doc.excluded)


def test_custom_rules_add_and_replace(swept, tmp_path):
    rules = tmp_path / "my.yaml"
    rules.write_text(yaml.safe_dump({"use_cases": [
        {"id": "busy-only", "title": "Busy servers", "select": {"loads": ["concurrency"], "min_concurrency": 16},
         "weights": {"tpot_p50_ms": 1}},
        {"id": "offline-batch", "title": "My batch", "weights": {"request_throughput_rps": 1},
         "constraints": [{"metric": "peak_vram_bytes", "max": "5GiB"}]},
    ]}))
    use_cases = load_rules([rules])
    assert [u.id for u in use_cases].count("offline-batch") == 1
    guide = {u.id: u for u in build_guide(load_runs([swept]), use_cases).use_cases}
    busy = guide["busy-only"]
    assert {r.values[0] for r in busy.details.rows} == {"chat[load.concurrency=16]"}
    assert busy.recommendation.startswith("batcher:")
    assert guide["offline-batch"].title == "My batch"
    assert any("peak VRAM 6.00 GiB > 5.00 GiB" in e for e in guide["offline-batch"].excluded)


def test_no_recommendation_when_nothing_it_ranks_by_was_measured(tmp_path):
    b = ResultsBuilder(tmp_path / "r")
    b.add("a", workload("w"), 0.05, 0.01)  # no resources block: no RAM, no VRAM
    b.add("b", workload("w"), 0.05, 0.02)
    rules = tmp_path / "ram.yaml"
    rules.write_text("use_cases: [{id: ram, title: Small RAM, weights: {max_rss_bytes: 1}}]")
    ram = next(u for u in build_guide(load_runs([b.write()]), load_rules([rules])).use_cases if u.id == "ram")
    assert ram.recommendation.startswith("No recommendation: none of the metrics")
    assert any(n.startswith("peak host RAM at w: not measured for a (cell m__a__w, run r), b (cell m__b__w, run r) "
                            "(no resources block in these results)") for n in ram.not_measured)


@pytest.mark.parametrize("content, where", [
    ("use_cases: [{id: x, title: y, weights: {nope: 1}}]", "use_cases[0].weights: unknown metric 'nope'"),
    ("use_cases: [{id: x, title: y, weights: {ttft_p50_ms: -1}}]", "weight of ttft_p50_ms must be > 0"),
    ("use_cases: [{id: x, title: y, weights: {ttft_p50_ms: 1}, constraints: [{metric: peak_vram_bytes}]}]",
     "use_cases[0].constraints[0]: give max or min"),
    ("use_cases: [{id: x, title: y, weights: {ttft_p50_ms: 1}, extra: 1}]", "use_cases[0].extra"),
    ("use_cases: [{id: x, title: y, weights: {ttft_p50_ms: 1}, constraints: [{metric: peak_vram_bytes, max: 8 lots}]}]",
     "expected a size like 8GiB"),
    ("[unclosed", "not valid YAML"),
])
def test_bad_rules_exit_2_naming_file_and_field(swept, tmp_path, content, where):
    rules = tmp_path / "bad.yaml"
    rules.write_text(content)
    with pytest.raises(RulesError, match="bad.yaml"):
        load_rules([rules])
    r = CliRunner().invoke(app, ["guide", str(swept), "--out", str(tmp_path / "g.md"), "--rules", str(rules)])
    assert r.exit_code == 2 and where in r.output and "Traceback" not in r.output


def test_cli_guide_formats(swept, tmp_path):
    runner = CliRunner()
    for name in ("guide.md", "guide.html"):
        r = runner.invoke(app, ["guide", str(swept), "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        text = (tmp_path / name).read_text()
        assert "High-throughput chat serving" in text and "overtakes" in text
    r = runner.invoke(app, ["guide", str(swept), "--out", str(tmp_path / "guide.txt")])
    assert r.exit_code == 2 and "expected a file name ending in .md or .html" in r.output


def test_the_guide_goes_beside_its_results_not_into_the_working_folder(swept, tmp_path, monkeypatch):
    results = tmp_path / "run"
    shutil.copytree(swept, results)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = CliRunner().invoke(app, ["guide", str(results)])
    assert r.exit_code == 0, r.output
    assert (results / "guide.md").is_file() and f"wrote {results / 'guide.md'}" in r.output
    r = CliRunner().invoke(app, ["guide", str(results), str(swept)])  # several runs: under results/
    assert r.exit_code == 0, r.output
    assert [p.relative_to(work).as_posix() for p in work.rglob("*")] == ["results", "results/guide.md"]


@pytest.mark.slow
def test_guide_escapes_injected_strings(scripted_results, tmp_path):
    results = hacked(scripted_results, tmp_path / "hacked", "<script>alert(1)</script>")
    html = write_guide([results], tmp_path / "g.html").read_text()
    md = write_guide([results], tmp_path / "g.md").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in md.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in md


# ---- the user's question, ties, and what a recommendation looks like ---------------------------------------------

def test_use_cases_name_their_question_and_long_prompts_rank_on_prefill():
    cases = {u.id: u for u in load_rules()}
    assert {"cpu-chat", "cpu-long-document"} <= set(cases) and "cpu-edge" not in cases
    for case in ("long-document-8gb", "cpu-long-document"):
        weights = cases[case].weights
        assert set(weights) >= {"ttft_ms.p50", "prefill_tps.p50"}
        assert max(weights, key=weights.get) == "ttft_ms.p50"  # the wait for the answer to start comes first
        assert "decode_tps.p50" not in weights and "output_throughput_tok_s" not in weights
    assert cases["cpu-chat"].select.max_input_tokens < cases["cpu-long-document"].select.min_input_tokens
    assert all(u.question.endswith("?") for u in cases.values())


def fastest(b: ResultsBuilder, tmp_path: Path):
    """The guide's one use case 'Which is fastest?' (TTFT and TPOT p50 weighted alike) over b's results."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("use_cases: [{id: fast, title: Fast, question: 'Which is fastest?', "
                     "weights: {ttft_p50_ms: 1, tpot_p50_ms: 1}}]")
    return next(u for u in build_guide(load_runs([b.write()]), load_rules([rules])).use_cases if u.id == "fast")


def test_a_tie_is_decided_by_the_tighter_interval_never_the_wider(tmp_path):
    """Values whose CIs overlap the best's are a tie, decided by the worse bound: a wide interval that merely overlaps
    a narrow one never ranks level with it, whether its median is worse (chat-dataset's llamacpp-server: TTFT p99
    1,311 ms [15.2–9,202.5] against own's 33.8 ms) or better."""
    assert normalized({"own": 33.8, "llama": 1311.0}, "lower",
                      intervals={"own": (30.1, 38.0), "llama": (15.2, 9202.5)}) == {"own": 1.0, "llama": 38.0 / 9202.5}
    wide_but_lower = normalized({"own": 12.0, "llama": 9.6}, "lower",
                                intervals={"own": (11.0, 13.0), "llama": (5.0, 60.0)})
    assert wide_but_lower == {"own": 1.0, "llama": 13.0 / 60.0}
    assert normalized({"a": 277.0, "b": 290.0}, "higher", intervals={"a": (270.0, 285.0), "b": (150.0, 400.0)}) == \
        {"a": 1.0, "b": 150.0 / 270.0}
    # Two tight intervals that overlap: nearly level, the surer one first.
    near = normalized({"a": 10.0, "b": 10.1}, "lower", intervals={"a": (9.5, 10.6), "b": (9.6, 10.7)})
    assert near["a"] == 1.0 and near["b"] == pytest.approx(10.6 / 10.7)

    b = ResultsBuilder(tmp_path / "r", repetitions=3)
    w = workload("w", input_tokens=256)
    b.add("a", w, 0.050, 0.010, rep_scale=[1.0, 1.02, 0.99])  # tight
    b.add("b", w, 0.049, 0.0099, rep_scale=[0.8, 1.2, 1.0])  # a better median, a wide interval
    b.add("c", w, 0.100, 0.020, rep_scale=[1.0, 1.02, 0.99])
    fast = fastest(b, tmp_path)
    scores = {r.values[1]: float(r.values[2]) for r in fast.ranking.rows}
    assert scores["a"] == 1.0 > scores["b"] > scores["c"], scores
    assert fast.recommendation.startswith("a:") and fast.recommended
    # The intervals are shown, so the reader sees why.
    assert any("[" in str(v) for r in fast.details.rows for v in r.values)


def test_the_guide_never_recommends_an_unstable_cell(tmp_path):
    """chat-dataset's guide recommended llamacpp-server although its cell was unstable: an unstable cell is left
    out, as the report's verdict leaves it out, and the reader is told why."""
    b = ResultsBuilder(tmp_path / "r", repetitions=3)
    w = workload("w", input_tokens=256)
    b.add("noisy", w, 0.020, 0.005, rep_scale=[1.0, 3.0, 0.5])  # the fastest median, repetitions that disagree
    b.add("steady", w, 0.050, 0.010, rep_scale=[1.0, 1.01, 0.99])
    fast = fastest(b, tmp_path)
    assert fast.recommendation.startswith("steady:"), fast.recommendation
    assert any(x.startswith("noisy at w: left out, unstable: repetitions disagree") for x in fast.excluded)
    assert any("noisy at w is left out: it is unstable" in x for x in fast.cautions)
    assert next(r for r in fast.details.rows if r.values[1] == "noisy").mark == "unstable"


def test_a_recommendation_states_its_margins_with_cis_tails_included(tmp_path):
    """The margins over the runner-up on every metric of the use case and the TTFT p99 it does not weight, each
    with both CIs and whether the difference is beyond noise; a tail worse beyond noise is a caution."""
    b = ResultsBuilder(tmp_path / "r", repetitions=3)
    w = workload("w", input_tokens=256, concurrency=2)
    b.add("fast", w, 0.020, 0.010, rep_scale=[1.0, 1.01, 0.99])
    b.add("slow", w, 0.040, 0.020, rep_scale=[1.0, 1.01, 0.99])
    rules = tmp_path / "rules.yaml"
    rules.write_text("use_cases: [{id: thr, title: Throughput, question: 'Which serves most?', "
                     "weights: {output_throughput_tok_s: 1}}]")
    thr = next(u for u in build_guide(load_runs([b.write()]), load_rules([rules])).use_cases if u.id == "thr")
    rec = thr.recommendation
    assert rec.startswith("fast:") and "against slow (95% CIs)" in rec
    assert "output tok/s " in rec and "% higher, beyond noise" in rec
    assert "TTFT p99 " in rec and "% lower, beyond noise" in rec and rec.count("[") >= 4
    assert not any("beyond noise" in c for c in thr.cautions)  # the winner's tail is not worse


def test_no_recommendation_looks_different(swept, tmp_path):
    for name in ("guide.md", "guide.html"):
        text = write_guide([swept], tmp_path / name).read_text()
        if name.endswith(".html"):
            # both CPU cases and capacity-at-slo: nothing ran there
            assert text.count('class="norec"') == 3 and 'class="rec"' in text
            assert "<strong>No recommendation</strong>" in text and '<p class="question">' in text
        else:
            assert text.count("> ⚠ **No recommendation**:") == 3 and "**Recommendation**:" in text


def test_load_time_excludes_one_off_preparation(tmp_path):
    b = ResultsBuilder(tmp_path / "r")
    hf = b.add("hf", workload("w"), 0.05, 0.01, load_time_s=3.0)
    gguf = b.add("llamacpp", workload("w"), 0.05, 0.01, load_time_s=1.0)
    gguf["prepare_time_s"], hf["prepare_time_s"] = 40.0, 0.0  # llamacpp converted to GGUF first
    ops = {u.id: u for u in build_guide(load_runs([b.write()]), load_rules()).use_cases}["production-operations"]
    header = ops.details.headers
    assert "one-off preparation (not in load time)" in header
    row = next(r for r in ops.details.rows if r.values[1] == "llamacpp")
    assert row.values[header.index("load time")] == "1.00 s"
    assert row.values[header.index("one-off preparation (not in load time)")] == "40.00 s"
    assert any("Load time excludes one-off preparation" in c for c in ops.cautions)


def test_rules_name_numbers_as_the_catalogue_does_and_the_old_spelling_still_reads(tmp_path):
    """One name per number (ttft_ms.p99, as results.json's ci and the gate name it); a rule file of an earlier version
    (ttft_p99_ms, decode_tps_p50) reads as the same statistics."""
    rules = tmp_path / "old.yaml"
    rules.write_text("use_cases: [{id: old, title: Old, weights: {ttft_p99_ms: 2, decode_tps_p50: 1}, "
                     "constraints: [{metric: tpot_p50_ms, max: 50}]}]")
    (old,) = [u for u in load_rules([rules]) if u.id == "old"]
    assert old.weights == {"ttft_ms.p99": 2, "decode_tps.p50": 1} and old.constraints[0].metric == "tpot_ms.p50"
    assert {"ttft_ms.p50", "itl_ms.p99", "decode_tps.p50", "goodput_rps", "peak_vram_bytes"} <= set(RANKED)
    assert "input_len.p50" not in RANKED  # context, not a merit: nothing to rank by
