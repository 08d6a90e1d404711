"""`bench report`: built from a small scripted run and from synthetic swept results (the quickstart's own report is
checked in tests/e2e); safe against injected strings; self-contained HTML; environment diff across runs."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.analyze.report import build_report, md_escape, write_report
from harness.results.runs import load_runs
from tests.report_fixtures import ResultsBuilder, hacked, resources, swept_gpu_results, workload

pytest_plugins = ["tests.report_fixtures"]

PAYLOAD = "<script>alert(1)</script>"


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text of <style> elements."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.styles: list[str] = []
        self._in_style = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def external_references(html: str) -> list[str]:
    found = []
    p = Tags(html)
    for tag, attrs in p.tags:
        for name in ("src", "href", "srcset", "action", "poster", "data", "formaction", "xlink:href"):
            v = attrs.get(name, "").strip().lower()
            if v.startswith(("http:", "https:", "//", "ftp:")):
                found.append(f"<{tag} {name}={v}>")
        if tag == "script" and "src" in attrs:
            found.append(f"<script src={attrs['src']}>")
        if tag == "link":
            found.append(f"<link {attrs}>")
        if re.search(r"url\(\s*['\"]?\s*(https?:|//)", attrs.get("style", ""), re.I):
            found.append(f"<{tag} style={attrs['style']}>")
    for css in p.styles:
        found += re.findall(r"@import[^;]*|url\(\s*['\"]?\s*(?:https?:|//)[^)]*\)", css, re.I)
    return found


def md_table_widths(md: str) -> list[int]:
    """Column count of every Markdown table line, counting only unescaped pipes."""
    return [len(re.findall(r"(?<!\\)\|", line)) for line in md.splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    return swept_gpu_results(tmp_path_factory.mktemp("swept") / "sweeps")


def test_external_reference_check_catches_them():
    bad = ('<link rel="stylesheet" href="https://cdn.example/x.css"><script src="//cdn.example/x.js"></script>'
           '<img src="http://x/y.png"><style>@import url(https://fonts.example/f.css); '
           'body{background:url(//x/y.png)}</style>')
    assert len(external_references(bad)) >= 5


@pytest.mark.slow
def test_injected_strings_are_escaped(scripted_results, tmp_path):
    results = hacked(scripted_results, tmp_path / "hacked", PAYLOAD)
    write_report([results], tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()

    # HTML: the payload appears only as text.
    assert PAYLOAD not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    tags = Tags(html).tags
    assert not [t for t, _ in tags if t == "script"]
    assert not [(t, a) for t, a in tags if any(k.startswith("on") for k in a)]
    assert "server said &lt;script&gt;" in html  # a request's error, from requests.jsonl
    assert external_references(html) == []

    # Markdown: no raw HTML, no link or image, and no table broken by a '|'.
    assert "<script" not in md.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert not re.search(r"(?<!\\)\]\(http", md) and "\\[x\\](http://evil" in md
    assert "model\\|" in md
    for block in md.split("\n\n"):
        widths = md_table_widths(block)
        assert len(set(widths)) <= 1, f"a table with uneven rows:\n{block}"
    # The failed cell is shown with its error's first line, not hidden.
    assert "FAILED" in md and "Traceback follows" not in md


def test_markdown_escape():
    assert md_escape("a|b") == "a\\|b"
    assert md_escape("<b>&") == "&lt;b&gt;&amp;"
    assert md_escape("![x](http://e/x.png)") == "!\\[x\\](http://e/x.png)"
    assert md_escape("two\nlines") == "two lines"


@pytest.mark.slow
def test_comparison_shows_environment_diff(scripted_results, tmp_path):
    a, b = tmp_path / "a" / "results", tmp_path / "b" / "results"
    shutil.copytree(scripted_results, a)
    shutil.copytree(scripted_results, b)
    data = json.loads((b / "results.json").read_text())
    original_cpu = data["environment"]["cpu"]["model"]
    data["environment"]["cpu"]["model"] = "Other CPU 9000"
    data["environment"]["packages"]["torch"] = "9.9.9"
    (b / "results.json").write_text(json.dumps(data))

    report = build_report(load_runs([a, b]))
    assert [r.values[0] for r in report.runs.rows] == ["results#1", "results#2"]
    diff = {r.values[0]: r.values[1:] for r in report.environment_diff.rows}
    assert diff["cpu.model"] == [original_cpu, "Other CPU 9000"]
    assert diff["packages.torch"][1] == "9.9.9"
    assert "cpu.model" not in {r.values[0] for r in report.environment.rows}
    assert "python" in {r.values[0] for r in report.environment.rows}  # the same in both: shared, not a diff
    # Every row names the run its numbers came from.
    section = report.sections[0]
    run_col = section.table.headers.index("run")
    runs_shown = [r.values[run_col] for r in section.table.rows]
    assert runs_shown.count("results#1") == runs_shown.count("results#2") == len(data["cells"])

    write_report([a, b], tmp_path / "out", ["md"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "What differs between runs" in md and "| cpu.model |" in md and "Other CPU 9000" in md


def test_swept_report_plots_and_marks(swept, tmp_path):
    b = ResultsBuilder(tmp_path / "extra")
    b.add("broken", workload("short"), 0.1, 0.01, failed="CUDA out of memory\nlong traceback here")
    b.add("hf", workload("short"), 0.1, 0.01, request_errors={1: "ValueError: boom"},
          resources=resources(None))
    extra = b.write()
    shutil.rmtree(extra / "cells")  # per-request samples gone: the box plots must say so

    report = build_report(load_runs([swept, extra]))
    slugs = {p.slug: p for s in report.sections for p in s.plots} | {p.slug: p for p in report.resource_plots}
    for slug in ("sweep-long-input_tokens", "sweep-chat-load-concurrency", "pareto-long", "pareto-chat",
                 "ttft-long", "tpot-chat", "vram"):
        assert slugs[slug].png and slugs[slug].png.startswith(b"\x89PNG"), slug
    assert any(s.startswith("timeline-") and p.png for s, p in slugs.items())
    assert slugs["ttft-short"].png is None and "no per-request samples" in slugs["ttft-short"].note
    assert "Latency and throughput vs context length" in slugs["sweep-long-input_tokens"].title

    long = next(s for s in report.sections if s.name == "long")
    assert "swept over input_tokens" in long.description
    assert "input_tokens" in long.table.headers
    marks = {r.cell: r.mark for s in report.sections for r in s.table.rows}
    assert marks["m__fastgpu__long_input_tokens_32768_"] == "over budget"
    assert marks["m__broken__short"] == "failed" and marks["m__hf__short"] == "request errors"
    row = next(r for s in report.sections for r in s.table.rows if r.cell == "m__broken__short")
    assert "CUDA out of memory" in row.values and "long traceback here" not in " ".join(map(str, row.values))
    vram_col = long.table.headers.index("peak VRAM / budget")
    assert next(r for r in long.table.rows if r.mark).values[vram_col] == "9.50 GiB / 8.00 GiB OVER BUDGET"
    short = next(s for s in report.sections if s.name == "short")
    hf_row = next(r for r in short.table.rows if r.cell == "m__hf__short")
    # Measured for no cell of the workload: no column, the reason said once beside the table.
    assert "peak VRAM / budget" not in short.table.headers
    assert "GPU measures (peak VRAM, utilisation, power, energy): not measured here: no NVIDIA GPU (NVML: NVML " \
           "Shared Library Not Found)." in short.notes
    assert any(str(v).startswith("1 of 8 requests") for v in hf_row.values)
    # Medians carry their 95% CI, from the same frame `bench export` writes.
    ttft = hf_row.values[short.table.headers.index("TTFT p50 (ms)")]
    assert ttft.ci and ttft.ci.startswith("[") and ttft.text.endswith(" ms")


def test_cli_report(swept, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(swept), "--out", str(tmp_path / "r"), "--format", "html"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "report.html").is_file() and not (tmp_path / "r" / "report.md").exists()
    r = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such results file" in r.output
    r = runner.invoke(app, ["report", str(swept), "--format", "pdf"])
    assert r.exit_code == 2


def test_report_removes_only_the_plots_it_wrote(swept, tmp_path):
    """Issue 25: `bench report RUN --out site` deleted every *.png in site/plots/ that this report did not draw.
    Now it removes only what its manifest says an earlier report wrote there, and refuses (exit 2) to replace a
    file of the user's that has the name of one of its plots."""
    from harness.core.files import WRITTEN

    plots = tmp_path / "site" / "plots"
    plots.mkdir(parents=True)
    (plots / "holiday.png").write_bytes(b"mine")
    write_report([swept], tmp_path / "site", ["md"])
    ours = json.loads((plots / WRITTEN).read_text())["files"]
    assert ours and "holiday.png" not in ours and all((plots / name).is_file() for name in ours)
    (plots / "stale.png").write_bytes(b"an earlier report's")
    (plots / WRITTEN).write_text(json.dumps({"files": [*ours, "stale.png"]}))
    write_report([swept], tmp_path / "site", ["md"])
    assert not (plots / "stale.png").exists() and (plots / "holiday.png").read_bytes() == b"mine"
    assert sorted(p.name for p in plots.iterdir()) == sorted([*ours, "holiday.png", WRITTEN])

    taken = tmp_path / "taken" / "plots"
    taken.mkdir(parents=True)
    (taken / ours[0]).write_bytes(b"mine too")
    r = CliRunner().invoke(app, ["report", str(swept), "--out", str(tmp_path / "taken"), "--format", "md"])
    assert r.exit_code == 2 and "were not written by bench report" in r.output and "Traceback" not in r.output
    assert (taken / ours[0]).read_bytes() == b"mine too" and len(list(taken.iterdir())) == 1


def verdict_cpu_results(out: Path) -> Path:
    """fast beats slow clearly on TTFT; twin ties fast on TPOT within noise; shaky is unstable; dead failed; own-disk
    streamed its offloaded weights from the page cache."""
    b = ResultsBuilder(out, repetitions=3)
    w = workload("short", num_requests=8)
    b.add("fast", w, 0.05, 0.010, resources=resources(None), rep_scale=[1.0, 1.04, 0.97])
    b.add("twin", w, 0.08, 0.0101, resources=resources(None), rep_scale=[1.02, 0.96, 1.0])
    b.add("slow", w, 0.20, 0.030, resources=resources(None), rep_scale=[1.0, 1.03, 0.98])
    b.add("shaky", w, 0.01, 0.005, resources=resources(None), rep_scale=[1.0, 10.0, 1.0])
    b.add("own-disk", w, 0.3, 0.05, kind="own", resources=resources(None),
          logical_io={"transfers": {"decode/disk->host": {"bytes": 24 * 2**30},
                                    "decode/host->disk": {"bytes": 8 * 2**20}}})
    b.add("dead", w, 0.05, 0.01, failed="llama_server exited (SIGKILL) after 10 requests\nlog tail")
    return b.write()


def test_the_report_opens_with_who_wins(tmp_path):
    report = build_report(load_runs([verdict_cpu_results(tmp_path / "r")]))
    v = report.verdict
    assert v.headers[:3] == ["workload", "TTFT p50 (ms)", "TPOT p50 (ms)"]
    (names, verdicts), = v.rows
    by_metric = dict(zip(v.headers[1:], verdicts))
    ttft = by_metric["TTFT p50 (ms)"]
    # shaky is fastest but unstable: it decides nothing, and says so.
    assert ttft.winner == "shaky" and ttft.kind == "undecided" and "not decided: shaky is unstable" in ttft.detail
    tpot = by_metric["TPOT p50 (ms)"]
    assert tpot.kind == "undecided" or tpot.winner == "shaky"
    e2e = by_metric["E2E p50 (ms)"]
    assert e2e.winner == "shaky"
    assert any("dead failed: llama_server exited (SIGKILL) after 10 requests" in n for n in v.notes)
    assert any("shaky is unstable" in n for n in v.notes)

    # Without the unstable cell, fast wins TTFT beyond noise and ties twin on TPOT.
    stable = build_report(load_runs([verdict_cpu_results(tmp_path / "s")]))
    cells = [c for c in load_runs([tmp_path / "s"])[0].cells if c.backend != "shaky"]
    from harness.analyze.report import Labels, Numbers, verdict
    numbers, labels = Numbers(load_runs([tmp_path / "s"])), Labels(cells)
    ttft = verdict(cells, "ttft_ms.p50", numbers, labels.backend)
    assert (ttft.winner, ttft.kind) == ("fast", "beyond") and ttft.detail.startswith("38% lower than twin")
    tpot = verdict(cells, "tpot_ms.p50", numbers, labels.backend)
    assert tpot.winner == "fast" and tpot.kind == "tie" and "tie within noise with twin" in tpot.detail
    thr = verdict(cells, "output_throughput_tok_s", numbers, labels.backend)
    assert thr.winner == "fast"
    assert stable.sections[0].name == "short"


def test_a_verdict_reads_latency_from_the_schedule_where_the_client_fell_behind(tmp_path):
    """late-client's engine answers in 30 ms, but its client sent every request 40 ms late: from the scheduled send
    (as its users waited) it takes 70 ms, and the verdict says fast wins."""
    from harness.analyze.report import Labels, Numbers, verdict

    b = ResultsBuilder(tmp_path / "r", repetitions=3)
    w = workload("short", num_requests=8)
    b.add("fast", w, 0.05, 0.010, resources=resources(None), rep_scale=[1.0, 1.04, 0.97])
    b.add("late-client", w, 0.03, 0.010, resources=resources(None), rep_scale=[1.0, 1.03, 0.98], client_lag_s=0.04)
    runs = load_runs([b.write()])
    late = next(c for c in runs[0].cells if c.backend == "late-client")
    assert late.cell.client_queue_shift and late.metric("ttft_ms.p50") == pytest.approx(30, rel=0.05)
    assert late.metric("ttft_including_client_queue_ms.p50") == pytest.approx(70, rel=0.05)
    ttft = verdict(runs[0].cells, "ttft_ms.p50", Numbers(runs), Labels(runs[0].cells).backend)
    assert ttft.winner == "fast" and ttft.kind == "beyond", ttft
    report = build_report(runs)
    assert any("late-client: its TTFT and E2E latency are read from the scheduled send time" in n
               for n in report.verdict.notes)
    assert any("moved its latencies beyond noise (coordinated omission)" in n for n in report.sections[0].notes)


def test_verdict_comes_first_and_setup_last(tmp_path):
    out = tmp_path / "out"
    write_report([verdict_cpu_results(tmp_path / "r")], out)
    for text, heading in (((out / "report.md").read_text(), "\n## {}\n"), ((out / "report.html").read_text(), ">{}</h2>")):
        order = [text.index(heading.format(h)) for h in ("Verdict", "Workload short", "Resources", "Failures",
                                                         "Setup: runs", "Environment", "Cells")]
        assert order == sorted(order)
    md = (out / "report.md").read_text()
    assert "| short | **shaky** 10.3 ms: 80% lower than fast; not decided: shaky is unstable |" in md
    # No cell measured VRAM: one line says why, no column of n/a.
    assert md.count("GPU measures (peak VRAM, utilisation, power, energy): not measured here: no NVIDIA GPU") == 1
    assert "peak VRAM / budget" not in md
    # The page cache served own-disk's "disk": its numbers are RAM speed, and the bytes say so.
    assert ("own-disk: the engine streamed 24.00 GiB from its disk tier, but its processes read 2.00 GiB from "
            "storage") in md and "RAM speed" in md
    html = (out / "report.html").read_text()
    assert 'class="mark unstable"' in html and "shaky is unstable: repetitions disagree" in html
    assert 'class="v-undecided"' in html and '<span class="ci">[' in html


def test_lengths_stated_as_measured_beside_the_settings_and_a_distribution_in_words(tmp_path):
    """chat-dataset's report said "1024 input tokens, 128 output tokens" of caps; the requests had 18-44 input tokens.
    A distribution printed as a raw dict."""
    from harness.analyze.report import describe_workload

    w = workload("w", input_tokens=256, output_tokens=16)
    b = ResultsBuilder(tmp_path / "r")
    b.add("hf", w, 0.05, 0.01)
    (section,) = build_report(load_runs([b.write()])).sections
    assert "measured per request: input tokens exactly 256, output tokens exactly 16" in section.description
    spec = {"name": "w", "input_tokens": 1024, "output_tokens": 128, "num_requests": 16,
            "prompts": {"type": "file", "path": "chat.json", "output_from": "data", "truncate": True}}
    text = describe_workload(spec)
    assert text.startswith("input tokens cut at 1024, output tokens from the data, else 128, 16 requests"), text
    dist = describe_workload({"name": "w", "input_tokens": 64, "num_requests": 4,
                              "output_tokens": {"dist": "lognormal", "mean": 64.0, "std": 32.0, "min": 8, "max": 512}})
    assert "lognormal, mean 64, std 32, 8–512 output tokens" in dist and "{" not in dist


def test_a_shared_prefix_shorter_than_the_engines_block_says_why_nothing_was_reused(tmp_path):
    w = workload("w") | {"prompts": {"type": "shared_prefix", "prefixes": 2, "prefix_tokens": 48}}
    b = ResultsBuilder(tmp_path / "r")
    for backend, reused in (("own", 0), ("other", 96)):
        cell = b.add(backend, w, 0.05, 0.01)
        cell["engine"]["block_size"] = 256
        cell["prefix_reuse"] = {"reused_tokens": reused, "source": "engine", "prompt_tokens": 8 * 64}
    table = build_report(load_runs([b.write()])).prefix_reuse
    rows = {r.values[3]: r.values for r in table.rows}
    assert rows["own"][6] == "0%" and "the shared prefix (48 tokens) is shorter than the engine's KV block (256 " \
                                      "tokens), and it reuses whole blocks only" in rows["own"][7]
    assert "shorter" not in rows["other"][7]  # it reused some: no such reason


def test_a_verdict_is_data_put_in_words_when_rendered(tmp_path):
    """The verdict keeps the numbers it was decided on (each backend's value and 95% CI, best first); its kind and
    its words are derived from them."""
    from harness.analyze.report import Labels, Numbers, verdict
    from harness.analyze.verdicts import Verdict

    runs = load_runs([verdict_cpu_results(tmp_path / "r")])
    cells = [c for c in runs[0].cells if c.backend in ("fast", "twin", "slow")]
    v = verdict(cells, "ttft_ms.p50", Numbers(runs), Labels(cells).backend)
    data = v.model_dump()
    assert data["metric"] == "ttft_ms.p50" and [m["backend"] for m in data["measured"]] == ["fast", "twin", "slow"]
    assert all(m["ci"] and m["ci"][0] <= m["value"] <= m["ci"][1] for m in data["measured"])
    again = Verdict.model_validate(data)
    assert (again.kind, again.detail) == (v.kind, v.detail) == ("beyond", v.detail)
    assert v.detail.startswith("38% lower than twin") and v.tied == []
