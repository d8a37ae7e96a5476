"""The head-analytics page in a real browser: headless Chromium (Debian's `chromium`, installed by `make test`) opens
it with no console messages, its script runs to the end, the heads table and the five heatmaps are in the DOM and
the heatmaps are drawn (viridis pixels in a screenshot). A negative control shows each check can fail."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.explain.heads import analyze_heads, write_heads_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
VIRIDIS_LOW = (0x44, 0x01, 0x54)     # the colour of each heatmap's smallest value


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


def _pixels_near(png: Path, rgb, tol: int = 6) -> int:
    import numpy as np
    from PIL import Image

    img = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).reshape(-1, 3).to(torch.int16)
    return int(((img - torch.tensor(rgb, dtype=torch.int16)).abs().max(dim=1).values <= tol).sum())


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    report = analyze_heads(model, torch.randn(8, 1, 16, 16), torch.arange(8), name="vl_test_vit")
    return write_heads_html(report, tmp_path_factory.mktemp("heads") / "heads.html")


def test_page_renders_in_chromium(page, tmp_path):
    console, dom, shot = _browser(page, tmp_path)
    assert console == [], f"console messages: {console}"
    assert 'data-ready="1"' in dom, "the page's script did not run to the end"
    table = re.search(r'<table id="heads">.*?</table>', dom, flags=re.S).group(0)
    assert table.count("<tr>") == 1 + 4 and table.count("<th ") == 7         # header + 2 layers x 2 heads
    assert dom.count('class="heat"') == 5
    assert _pixels_near(shot, VIRIDIS_LOW) > 5 * 30 * 30, "the heatmaps are not drawn"


def test_browser_checks_can_fail(page, tmp_path):
    broken = tmp_path / "broken.html"
    text = page.read_text()
    text = re.sub(r"<svg.*?</svg>", "", text, flags=re.S)              # no heatmaps
    text = text.replace("<script>", "<script>undefinedFunction();")    # a script error
    broken.write_text(text)
    console, dom, shot = _browser(broken, tmp_path)
    assert any("undefinedFunction" in m for m in console)
    assert 'data-ready="1"' not in dom
    assert _pixels_near(shot, VIRIDIS_LOW) == 0
