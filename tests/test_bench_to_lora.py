"""benchmarks/bench_to_lora.py runs end to end in quick mode (tiny model) and writes its tables and plot."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.mark.slow
def test_bench_to_lora_quick(tmp_path):
    import bench_to_lora

    result = bench_to_lora.main(["--quick", "--out", str(tmp_path)])
    timing, ranks = result["tables"]
    assert [row[1] for row in timing.rows][:2] == ["exact", "rank 16"] and all(row[3] > 0 for row in timing.rows)
    errors = [row[1] for row in ranks.rows]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5  # more rank, less error; exact at the end
    assert result["png"].is_file() and (tmp_path / "to_lora_quick.md").is_file()
