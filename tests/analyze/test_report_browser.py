"""The HTML report in a real browser: headless Chromium loads it from file://, every plot decodes, and the
screenshot shows non-blank pixels where each plot sits. Skipped where Chromium is not installed."""

from __future__ import annotations

import html as htmllib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from harness.analyze.report import write_report
from tests.report_fixtures import swept_gpu_results

pytest_plugins = ["tests.report_fixtures"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="headless Chromium not installed (Debian: apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--virtual-time-budget=10000"]
WIDTH = 1280

# Written into a copy of the report: where each plot landed and whether it decoded. The copy's CSP gains
# script-src for this probe only; its img-src stays as in the report, so images load under the same rules.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('img.plot')].map(i => {
    const r = i.getBoundingClientRect();
    return {alt: i.alt, naturalWidth: i.naturalWidth, complete: i.complete,
            x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
  });
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({height: document.documentElement.scrollHeight, imgs});
  document.body.appendChild(pre);
});
</script>"""


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=120)


def check_in_browser(report: Path, tmp_path: Path, expected_titles: list[str]) -> None:
    """Every plot of the report decodes and shows ink on screen; `expected_titles` are among them."""
    page = report.read_text()
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
                          .replace("</body>", PROBE + "</body>", 1))
    dom = chromium(probe_page.as_uri(), tmp_path / "profile", f"--window-size={WIDTH},1000", "--dump-dom")
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m, f"the probe did not run:\n{dom.stderr[-2000:]}"
    probe = json.loads(htmllib.unescape(m.group(1)))
    imgs = probe["imgs"]
    assert set(expected_titles) <= {i["alt"] for i in imgs}
    assert len(imgs) == page.count('<img class="plot"')
    for i in imgs:
        assert i["complete"] and i["naturalWidth"] > 0 and i["w"] > 50 and i["h"] > 50, i

    # The screenshot is of the report itself, as a reader opens it, tall enough to hold every plot.
    height = min(int(probe["height"]) + 50, 16000)
    shot = tmp_path / "shot.png"
    r = chromium(report.as_uri(), tmp_path / "profile", f"--window-size={WIDTH},{height}", f"--screenshot={shot}")
    assert shot.is_file(), r.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[1] == WIDTH
    for i in imgs:
        y0, x0 = int(i["y"]), int(i["x"])
        region = pixels[y0 + 5:y0 + int(i["h"]) - 5, x0 + 5:x0 + int(i["w"]) - 5]
        assert region.size, f"{i['alt']} lies outside the screenshot"
        ink = (region.mean(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
        rgb = (region * 255).astype(np.uint32)
        colours = len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))
        assert 0.005 < ink < 0.9 and colours > 20, \
            f"{i['alt']}: looks blank or broken (ink {ink:.3f}, {colours} colours)"


def test_swept_report_renders(tmp_path):
    write_report([swept_gpu_results(tmp_path / "sweeps")], tmp_path / "out", ["html"])
    check_in_browser(tmp_path / "out" / "report.html", tmp_path, [
        "TTFT per request: long", "TPOT per request: chat",
        "Latency and throughput vs context length (input_tokens): long",
        "Throughput and latency vs load.concurrency: chat", "Throughput vs latency: chat", "Peak VRAM per cell",
        "Resources over time: m__fastgpu__long_input_tokens_8192_ (sweeps)"])


# ---- the first screen decides -------------------------------------------------------------------------------------

FIRST_SCREEN = """<script>
window.addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect(); return {x: r.left, y: r.top + scrollY, w: r.width, h: r.height}; };
  const verdict = document.querySelector('table.verdict');
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({
    table: verdict ? box(verdict) : null,
    overflowing: [...document.querySelectorAll('.scroll')].filter(s => s.scrollWidth > s.clientWidth + 1)
                   .map(s => s.previousElementSibling ? s.previousElementSibling.textContent.slice(0, 60) : '?'),
    widest: Math.max(...[...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right))});
  document.body.appendChild(pre);
});
</script>"""


def check_first_screen(report: Path, tmp_path: Path) -> None:
    """At 1,400 × 900 the verdict table is on the first screen, and no table is wider than the page."""
    page = report.read_text()
    probe_page = tmp_path / "first.html"
    probe_page.write_text(page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
                          .replace("</body>", FIRST_SCREEN + "</body>", 1))
    dom = chromium(probe_page.as_uri(), tmp_path / "profile", "--window-size=1400,900", "--dump-dom")
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m, f"the probe did not run:\n{dom.stderr[-2000:]}"
    probe = json.loads(htmllib.unescape(m.group(1)))
    assert probe["table"], f"{report}: no verdict table (a report from before the verdict: regenerate it)"
    assert probe["table"]["y"] + probe["table"]["h"] <= 900, probe
    assert probe["overflowing"] == [] and probe["widest"] <= 1400, probe

    shot = tmp_path / "first.png"
    r = chromium(report.as_uri(), tmp_path / "profile", "--window-size=1400,900", f"--screenshot={shot}")
    assert shot.is_file(), r.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1400)
    t = probe["table"]
    region = pixels[int(t["y"]) + 2:int(t["y"] + t["h"]) - 2, int(t["x"]) + 2:int(t["x"] + t["w"]) - 2]
    ink = (region.mean(axis=2) < 0.6).mean()  # text
    tinted = ((region.max(axis=2) - region.min(axis=2)) > 0.04).mean()  # the verdicts' coloured cells
    assert 0.01 < ink < 0.5 and tinted > 0.05, (ink, tinted)


def test_the_first_screen_shows_the_verdict(tmp_path):
    from tests.analyze.test_report import verdict_cpu_results

    write_report([verdict_cpu_results(tmp_path / "cpu"), swept_gpu_results(tmp_path / "sweeps")], tmp_path / "out",
                 ["html"])
    check_first_screen(tmp_path / "out" / "report.html", tmp_path)


def test_the_example_report_opens_with_its_verdict(tmp_path):
    """reports/example/ is regenerated from a quickstart run (see docs/reports.md): its first screen decides."""
    check_first_screen(Path(__file__).resolve().parents[2] / "reports/example/report.html", tmp_path)
