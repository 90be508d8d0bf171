"""The HTML report in headless Chromium: it renders, every figure loads, a screenshot is saved.

Needs Debian's ``chromium`` (``apt-get install -y --no-install-recommends chromium``). The
screenshot is kept at ``build/test-artifacts/analyzer-report.png`` for a human to look at.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

from tests.analyzer.conftest import Analysed

REPO = Path(__file__).resolve().parents[2]
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Counts images that decoded (naturalWidth > 0) once the page has loaded.
PROBE = (
    "<script>window.addEventListener('load',function(){var n=0,i=document.images;"
    "for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0){n++;}}"
    "document.body.setAttribute('data-images-total',i.length);"
    "document.body.setAttribute('data-images-loaded',n);});</script>"
)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed: apt-get install -y --no-install-recommends chromium"
    return path


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_renders_in_chromium_with_every_figure(analysed: Analysed, tmp_path: Path) -> None:
    html = analysed.store.get_bytes(analysed.manifest["outputs"]["report.html"]).decode()
    n_figures = html.count("<img ")
    assert n_figures >= 10
    page = tmp_path / "report.html"
    page.write_text(html)
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))

    dom = _run(["--dump-dom", probe.as_uri()], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    assert total and loaded, body.group(0)
    assert int(total.group(1)) == n_figures
    assert int(loaded.group(1)) == n_figures
    assert '<h2 id="methods">Methods and limitations</h2>' in dom.stdout

    shot = REPO / "build" / "test-artifacts" / "analyzer-report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    out = _run(
        [f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri()],
        tmp_path / "profile-shot",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 3000)
    assert len(data) > 50_000  # a blank page compresses to a few kB
