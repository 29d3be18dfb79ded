"""The benchmark harness runs end to end in quick mode and produces well-formed tables (not a speed test)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_bench_lora_quick_table(tmp_path):
    import bench_lora

    result = bench_lora.main(["--quick", "--warmup", "0", "--out", str(tmp_path)])
    train, infer, targets = result["tables"]
    assert train.columns[:6] == ["contender", "trainable params", "median step ms", "IQR ms", "x floor", "x PEFT"]
    assert [row[0] for row in train.rows] == ["floor", "lorakit LoRA", "PEFT LoRA"]
    for row in train.rows:
        step_ms, ratio, saved = row[2], row[4], row[8]
        assert step_ms > 0 and ratio > 0 and saved > 0
    floor, ours, peft = train.rows
    assert floor[1] == 0 and ours[1] == peft[1] > 0  # same trainable parameter count in both libraries
    assert floor[4] == 1.0  # a contender against itself
    # LoRA keeps the floor's activations plus its own r-wide ones: more than the floor, identical to PEFT
    assert ours[8] > floor[8] and ours[8] == pytest.approx(peft[8])
    assert [row[0] for row in infer.rows] == ["base model", "lorakit merged", "lorakit unmerged", "PEFT unmerged"]
    assert all(row[1] > 0 for row in infer.rows)
    assert [row[0] for row in targets.rows][0] == "lorakit step / PEFT step"
    assert result["data"]["merged_equals_unmerged"] is True
    assert result["data"]["first_loss"]["lorakit LoRA"] == pytest.approx(result["data"]["first_loss"]["PEFT LoRA"])
    md = (tmp_path / "lora_quick.md").read_text()
    assert "| contender | trainable params | median step ms |" in md and "command:" in md
    payload = json.loads((tmp_path / "lora_quick.json").read_text())
    assert payload["meta"]["torch"] == torch.__version__ and payload["meta"]["threads"] >= 1
    assert len(payload["data"]["step_times_s"]["floor"]) == 2  # quick mode: 2 timed rounds


def test_bytes_saved_counts_distinct_storages_once():
    from common import bytes_saved_for_backward

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(8, 8))

        def forward(self, input_ids, labels):
            h = input_ids @ self.w  # saves input_ids (4 * 8 fp32 = 128 B) and w (a parameter)
            h2 = h * h  # saves h twice: one storage (4 * 8 fp32 = 128 B)
            return type("Out", (), {"loss": h2.sum()})()

    saved = bytes_saved_for_backward(Net(), {"input_ids": torch.ones(4, 8, requires_grad=True),
                                             "labels": None})
    assert saved["activations"] == 4 * 8 * 4 + 4 * 8 * 4  # input and h, each once
    assert saved["total"] == saved["activations"] + 8 * 8 * 4  # plus the weight


def test_alternate_rotates_and_table_checks_width():
    from common import Contender, Table, alternate

    order = []
    cs = [Contender(n, torch.nn.Identity()) for n in "abc"]
    times = alternate(cs, lambda c: order.append(c.name), warmup=0, rounds=3)
    assert order == list("abc" "bca" "cab") and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    t = Table("t", ["x", "y"])
    with pytest.raises(ValueError, match="2 columns"):
        t.add(1)


def test_methods_sections_skip_missing_method():
    import bench_methods

    with pytest.raises(bench_methods.Skip, match="not registered"):
        bench_methods.need_method("no_such_method")


@pytest.mark.slow
def test_bench_compile_quick_table(tmp_path):
    """bench_compile runs end to end (tiny sizes): eager and compiled twins agree on the first loss, lorakit's
    compiled model is one graph, and the FLOP table counts what LoRA adds (3·r·(in+out) per token and layer)."""
    import bench_compile
    from common import SIZES

    result = bench_compile.main(["--quick", "--only", "qlora", "--rounds", "1", "--warmup", "0", "--out",
                                 str(tmp_path)])
    section, flops, targets = result["tables"]
    names = [row[0] for row in section.rows]
    assert names == ["lorakit QLoRA", "lorakit QLoRA compiled"]
    eager_row, compiled_row = section.rows
    assert compiled_row[5] == "1 (fullgraph)" and compiled_row[6] > 0
    assert compiled_row[7] == pytest.approx(eager_row[7], rel=1e-4)  # same first training loss
    size = SIZES["quick"]
    shapes = bench_compile.linear_shapes(size)
    assert len(shapes) == 7 * size.layers
    lora_row = next(row for row in flops.rows if row[0].startswith("multiply-adds the adapter adds"))
    assert lora_row[2] == sum(3 * 16 * (i + o) for i, o in shapes)
    assert (tmp_path / "compile_quick.md").exists() and (tmp_path / "compile_quick.json").exists()
