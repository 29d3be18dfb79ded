"""The compare report: files exist, hold the measured numbers, and the HTML opens cleanly in headless Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from lorakit.compare import quality_notes, table_markdown, write_report


def fake_results(tmp_path):
    rows = []
    for i, (name, acc) in enumerate([("head-only", 0.70), ("full", 0.86), ("lora", 0.84), ("vera", 0.78),
                                     ("dora", 0.835)]):
        kind = {"head-only": "head", "full": "full"}.get(name, "adapter")
        rows.append({"name": name, "kind": kind, "trainable_params": 1000 * (i + 1) ** 3,
                     "total_params": 22_700_000, "trainable_pct": 100 * 1000 * (i + 1) ** 3 / 22.7e6,
                     "accuracy": acc, "eval_loss": 0.5 - i / 100, "seconds_per_step": 0.3 + i / 10,
                     "wall_seconds": 30.0, "peak_rss_bytes": 900_000_000 + i, "artifact_bytes": 10_000 * (i + 1),
                     "losses": [0.7 - 0.002 * s - i / 100 for s in range(50)], "settings": {}})
    return {"config": {"model": "tiny", "data": "toy", "eval_size": 100, "steps": 50, "batch_size": 8,
                       "max_length": 32, "seed": 0}, "rows": rows, "skipped": {"sora": "not available: test"},
            "total_seconds": 12.0, "date": "2026-11-26", "environment": {"threads": 2, "torch": "2.13.0"}}


def test_report_files_hold_the_numbers(tmp_path):
    results = fake_results(tmp_path)
    write_report(results, tmp_path / "report")
    out = tmp_path / "report"
    for f in ("results.json", "report.md", "report.html", "loss_curves.png", "accuracy_vs_params.png"):
        assert (out / f).stat().st_size > 0, f
    md = (out / "report.md").read_text()
    for r in results["rows"]:
        assert f"| {r['name']} | {r['trainable_params']:,} |" in md
        assert f"{r['accuracy']:.3f}" in md
    assert json.loads((out / "results.json").read_text())["rows"][2]["accuracy"] == 0.84
    # VeRA is 6 points below LoRA: the report must say so and why; DoRA (0.5 points) must not be listed
    notes = quality_notes(results["rows"])
    assert any(n.startswith("**vera**") and "6.0 points" in n for n in notes)
    assert not any("dora" in n for n in notes) and "sora" in md
    assert not any("head-only" in n for n in notes)  # baselines are references, not family members
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_markdown_handles_missing_values():
    row = {"name": "x", "trainable_params": 5, "trainable_pct": 0.1, "accuracy": None, "eval_loss": float("nan"),
           "seconds_per_step": 0.25, "peak_rss_bytes": 2_500_000, "artifact_bytes": 999}
    line = table_markdown([row]).splitlines()[-1]
    assert line == "| x | 5 | 0.100% | – | – | 0.250 s | 2.5 MB | 999 B |"


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def open_in_chromium(page, images: int) -> str:
    """Open ``page`` in headless Chromium: it renders (a table and ``images`` embedded PNG images, each a valid
    PNG) with no console errors; returns the rendered DOM."""
    import base64
    import re

    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=3000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<table>" in dom and "lora" in dom and dom.count("<img") == images
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', dom):
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    return dom


def test_html_report_opens_in_headless_chromium_without_console_errors(tmp_path):
    assert _chromium() is not None, "chromium is not installed: ./run.sh test installs Debian's package"
    write_report(fake_results(tmp_path), tmp_path / "report")
    open_in_chromium(tmp_path / "report" / "report.html", images=2)
