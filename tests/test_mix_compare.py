"""``lorakit mix-compare`` end to end on the real MiniLM and VADER/chatterbot data, tiny budget (slow)."""
from __future__ import annotations

import json
import math

import pytest
from test_cli import run

pytestmark = pytest.mark.slow


def _check_consistent(results, tasks, eval_size):
    rows = results["singles"] + ([results["reference"]] if results["reference"] else []) + results["mixes"]
    assert [r["label"] for r in results["singles"]] == [f"only {t}" for t in tasks]
    for r in rows + results["tradeoff"]["points"]:
        accs = r["accuracy"]
        for a in accs.values():  # a count of right answers out of eval_size
            assert 0 <= a <= 1 and math.isclose(a * eval_size, round(a * eval_size), abs_tol=1e-6)
        assert math.isclose(r["average"], sum(accs.values()) / len(accs), abs_tol=1e-9)
    hows = {m["how"] for m in results["mixes"]}
    assert hows == {"task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    for m in results["mixes"]:
        assert set(m["accuracy"]) == set(tasks) and m["rank_max"] >= m["rank_min"] >= 1
    # weight 1 on the first task, 0 on the second, by task arithmetic, is that task's adapter exactly
    first, _ = results["tradeoff"]["tasks"]
    end = next(p for p in results["tradeoff"]["points"] if p["how"] == "task_arithmetic" and p["weight_first"] == 1)
    assert end["accuracy"][first] == results["singles"][tasks.index(first)]["accuracy"][first]


def _check_files(out):
    for name in ("results.json", "report.md", "report.html", "per_task_accuracy.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and 'src="http' not in page  # self-contained
    return json.loads((out / "results.json").read_text())


def test_default_tasks_tiny_run_writes_a_consistent_report(tmp_path, capsys):
    out = tmp_path / "mix"
    code, stdout, err = run(["mix-compare", "--tasks", "movies,tweets,nyt", "--steps", "2", "--eval-size", "20",
                             "--densities", "0.5", "--threads", "1", "--out", str(out)], capsys)
    assert code == 0, err
    results = _check_files(out)
    _check_consistent(results, ["movies", "tweets", "nyt"], 20)
    assert results["reference"] is not None and results["one_label_set"]
    md = (out / "report.md").read_text()
    assert "ties d=0.5" in md and "all tasks together" in md and stdout.strip().startswith("# lorakit mix-compare")


def test_tasks_with_their_own_label_sets_keep_their_own_heads(tmp_path, capsys):
    out = tmp_path / "mix"
    code, _, err = run(["mix-compare", "--tasks", "movies,topics", "--steps", "2", "--eval-size", "20",
                        "--densities", "0.5", "--threads", "1", "--out", str(out)], capsys)
    assert code == 0, err
    results = _check_files(out)
    _check_consistent(results, ["movies", "topics"], 20)
    assert results["reference"] is None and not results["one_label_set"]
    assert len(results["labels"]["topics"]) >= 5 and results["labels"]["movies"] == ["0", "1"]


def test_bad_tasks_are_one_line(capsys):
    code, _, err = run(["mix-compare", "--tasks", "movies,cooking"], capsys)
    assert code == 2 and "unknown task(s) ['cooking']" in err
