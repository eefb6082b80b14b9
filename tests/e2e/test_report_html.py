"""The HTML reports render in a real browser: the demo's (from a short real run: lab pods, Envoy,
lab devices) and the bench's (from a committed bench result). Headless Chromium screenshots
each page; every series colour of its charts must cover many pixels, and none may appear in a
render of the same page without its charts."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import streamlb_testkit as kit

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
# A series colour must cover at least this many pixels: far more than its legend key.
MIN_SERIES_PIXELS = 150
COLOR_TOLERANCE = 24


def chromium() -> str:
    path = shutil.which("chromium")
    if not path:
        pytest.fail("chromium missing: run `make deps` (Debian package chromium)")
    return path


def screenshot(page: Path, out: Path, size: tuple[int, int]) -> np.ndarray:
    """The page rendered at `size` (width, height) as an RGB array."""
    profile = out.with_suffix(".profile")
    profile.mkdir()
    argv = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
            f"--window-size={size[0]},{size[1]}", page.as_uri()]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and out.exists(), f"chromium failed ({result.returncode}):\n{result.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def series_colors(page_html: str) -> set[str]:
    """Stroke and fill colours in the page's SVGs that are not grey (the series, not axes or text)."""
    colors = set()
    for svg in re.findall(r"<svg.*?</svg>", page_html, flags=re.S):
        for hex_color in re.findall(r"(?:stroke|fill):\s*(#[0-9a-fA-F]{6})", svg):
            rgb = [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]
            if max(rgb) - min(rgb) > 40:
                colors.add(hex_color.lower())
    return colors


def pixels_of(image: np.ndarray, hex_color: str) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image - rgb).max(axis=2) <= COLOR_TOLERANCE).sum())


def assert_charts_render(page: Path, tmp_path: Path, size: tuple[int, int], min_colors: int) -> None:
    page_html = page.read_text()
    colors = series_colors(page_html)
    assert len(colors) >= min_colors, f"only {sorted(colors)} in {page.name}"
    blank = page.with_name(page.stem + "-without-charts.html")
    blank.write_text(re.sub(r"<svg.*?</svg>", "", page_html, flags=re.S))
    drawn = screenshot(page, tmp_path / (page.stem + ".png"), size)
    empty = screenshot(blank, tmp_path / (blank.stem + ".png"), size)
    counts = {c: pixels_of(drawn, c) for c in colors}
    missing = {c: n for c, n in counts.items() if n < MIN_SERIES_PIXELS}
    assert not missing, f"series not drawn in {page.name} (pixels per colour): {counts}"
    assert all(pixels_of(empty, c) == 0 for c in colors), "series colours without any chart: the control is wrong"


def test_demo_report_draws_every_pod_of_every_policy(tmp_path):
    out_dir = tmp_path / "demo"
    argv = [sys.executable, str(kit.REPO / "tools" / "demo.py"), "--duration", "6", "--streams", "6", "--rate", "10",
            "--out-dir", str(out_dir)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, cwd=kit.REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # The summary table: one row per policy, nothing lost in the devices' ledger.
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    for policy in ("least_request", "streamlb", "streamlb_rebalance"):
        assert re.search(r"\| 0 of [1-9]\d* \|$", rows[policy]), rows[policy]
    result = json.loads((out_dir / "demo.json").read_text())
    assert [p["policy"] for p in result["policies"]] == ["least_request", "streamlb", "streamlb_rebalance"]
    assert all(p["reconnects"]["storm"] == 6 for p in result["policies"]), "every device reconnected in the storm"
    page = out_dir / "report.html"
    assert "<table>" in page.read_text()
    # Six pods, each its own colour, in every policy's row of the chart.
    assert_charts_render(page, tmp_path, (1200, 1800), min_colors=6)


@pytest.fixture
def bench_report():
    spec = importlib.util.spec_from_file_location("bench_report", kit.REPO / "bench" / "report.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_report_has_a_real_table_and_draws_its_charts(bench_report, tmp_path):
    source = sorted((kit.REPO / "bench" / "results").glob("*.json"))[-1]
    out = json.loads(source.read_text())
    page = tmp_path / "bench.html"
    page.write_text(bench_report.html(out))
    text = page.read_text()
    assert "<pre>" not in text
    table = re.search(r"<table>.*?</table>", text, flags=re.S)
    assert table, "results table missing"
    for policy in out["policies"]:
        assert f"<td>{policy}</td>" in table.group(0)
    assert_charts_render(page, tmp_path, (1200, 7000), min_colors=3)


def test_bench_report_says_how_far_each_policy_is_from_the_online_reference(bench_report):
    """Rounds are matched to their oracle by seed, not by order."""
    out = {"policies": {"streamlb": {"rounds": [{"seed": 9, "max_over_mean": 1.2}, {"seed": 8, "max_over_mean": 1.1}]},
                        "failed": {"rounds": [{"seed": 8, "error": "boom"}]}},
           "oracle_rounds": [{"seed": 8, "online_any_pod": 1.15}, {"seed": 9, "online_any_pod": 1.17}]}
    lines = bench_report.against_online(out)
    assert lines[-1] == ("Pod max/mean minus the online reference (any pod) of the same round: "
                         "streamlb +0.030 / -0.050 (median -0.010).")
    assert bench_report.against_online({"policies": out["policies"]}) == []
