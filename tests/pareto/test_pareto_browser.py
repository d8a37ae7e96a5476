"""The Pareto report in a real browser: headless Chromium (Debian's `chromium`, installed by `make test`) opens
report.html with no console messages, its script runs to the end, and the plot is drawn (coloured plot pixels in a
screenshot). Negative controls show each check can fail."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vitlab.pareto import SweepConfig, run_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
TOKENS_BLUE = (0x1F, 0x77, 0xB4)     # report.COLORS["tokens"]
STAR = (0xFF, 0xBF, 0x00)           # the recommended point


def _browser(page: Path, tmp: Path) -> tuple[list[str], str, Path]:
    """(console messages, DOM after scripts ran, screenshot path) of `page` in headless Chromium."""
    assert CHROMIUM, "chromium is not installed: run `make browser` (Debian's chromium package)"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={tmp / 'profile'}", "--window-size=1300,1500", "--hide-scrollbars"]
    shot = tmp / f"{page.stem}.png"
    run = subprocess.run(args + [f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    console = re.findall(r"CONSOLE[^\]]*\] (.*)", run.stderr)
    dom = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert shot.exists(), run.stderr[-2000:]
    return console, dom, shot


def _pixels_near(png: Path, rgb, tol: int = 12) -> int:
    import numpy as np
    from PIL import Image

    img = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"))).reshape(-1, 3).to(torch.int16)
    return int(((img - torch.tensor(rgb, dtype=torch.int16)).abs().max(dim=1).values <= tol).sum())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pareto")
    cfg = SweepConfig(source="vl_test_vit", out=str(out), data="synthetic:n=64,classes=10", max_drop_pt=100.0,
                      techniques=["tome:r=1; tome:r=2"], min_time_s=0.02, memory=False, threads=1)
    run_sweep(cfg, progress=False, log=lambda *_: None)
    return out / "report.html"


def test_report_renders_in_chromium(report, tmp_path):
    console, dom, shot = _browser(report, tmp_path)
    assert console == [], f"console messages: {console}"
    assert 'data-ready="1"' in dom, "the report's script did not run to the end"
    assert "<svg" in dom and dom.count("<tr") >= 4
    assert _pixels_near(shot, TOKENS_BLUE) > 30, "no token-reduction points drawn in the plot"
    assert _pixels_near(shot, STAR) > 30, "the recommended point (star) is not drawn"


def test_browser_checks_can_fail(report, tmp_path):
    broken = tmp_path / "broken.html"
    text = report.read_text()
    text = re.sub(r"<svg.*?</svg>", "", text, flags=re.S)           # no plot
    text = text.replace("<script>", "<script>undefinedFunction();")  # a script error
    broken.write_text(text)
    console, dom, shot = _browser(broken, tmp_path)
    assert any("undefinedFunction" in m for m in console)
    assert 'data-ready="1"' not in dom
    assert _pixels_near(shot, TOKENS_BLUE) == 0
