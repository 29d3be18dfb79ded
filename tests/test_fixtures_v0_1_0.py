"""Adapters saved by lorakit 0.1.0 still load, with identical outputs (issue 12's promise to users).

``tests/fixtures/v0_1_0/`` holds folders written by the 0.1.0 code (commit a8d3c18) and the outputs 0.1.0 gave after
loading each into a fresh base; ``tests/fixtures/make_v0_1_0.py`` wrote them (see its docstring to regenerate). Here
the current code rebuilds each base from its seed (the checksum proves it is the same base), loads the saved folder
and must give the same outputs bit for bit: with every adapter active, with each alone, and (close) after merging.

0.1.0 trained a ``modules_to_save`` module in place, so two adapters naming the same head shared it; now each adapter
loads its own copy (issue 11, README "Each adapter owns its head"). Such a 0.1.0 folder holds bit-identical copies,
so with both adapters active the head is unambiguous and the folder computes what it did in 0.1.0.
"""
from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V0_1_0 = FIXTURES / "v0_1_0"
sys.path.insert(0, str(FIXTURES))
import bases_v0_1_0 as bases  # noqa: E402  (shared with the generator; imports no lorakit)

# merging changes the order of the float operations (W + s·BA once, instead of x·W + s·(x·A)·B every call)
MERGE_RTOL, MERGE_ATOL = 1e-4, 1e-5


def fixture_names() -> list[str]:
    return json.loads((V0_1_0 / "index.json").read_text())


def cases() -> list[tuple[str, str]]:
    out = []
    for fixture in fixture_names():
        meta = json.loads((V0_1_0 / fixture / "fixture.json").read_text())
        out += [(fixture, fmt) for fmt in meta["formats"]]
    return out


@functools.cache
def pristine_base(kind: str, sha256: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Base ``kind`` rebuilt from its seed, checked against the checksum 0.1.0's generator stored (built once)."""
    model, x = bases.build(kind)
    assert bases.state_sha256(model) == sha256, (
        f"base {kind!r} does not rebuild bit for bit (torch/transformers initialisation changed?); the fixtures "
        f"cannot be compared until tests/fixtures/make_v0_1_0.py is run again against 0.1.0")
    return model, x


def fresh_base(meta: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """A copy of the pristine base, with the 4-bit layers the adapter was saved on (QLoRA, LoftQ): quantised by the
    same ``lorakit.quantize`` calls the generator made, which are deterministic, so the packed weights are 0.1.0's."""
    model, x = pristine_base(meta["base"], meta["base_sha256"])
    model = copy.deepcopy(model)
    for settings in meta.get("quantised_base", []):
        lorakit.quantize(model, **{**settings, "compute_dtype": getattr(torch, settings["compute_dtype"])})
    return model, x


def loaded(fixture: str, fmt: str):
    """(meta, expected outputs, model with the folder loaded, input)."""
    meta = json.loads((V0_1_0 / fixture / "fixture.json").read_text())
    expected = load_file(str(V0_1_0 / fixture / "expected.safetensors"))
    model, x = fresh_base(meta)
    lorakit.load(model, V0_1_0 / fixture / fmt)
    return meta, expected, model, x


def test_every_fixture_folder_is_present():
    for fixture in fixture_names():
        meta = json.loads((V0_1_0 / fixture / "fixture.json").read_text())
        for fmt in meta["formats"]:
            assert (V0_1_0 / fixture / fmt).is_dir(), f"{fixture}/{fmt}"
    total = sum(p.stat().st_size for p in V0_1_0.rglob("*") if p.is_file())
    assert total < 2_000_000, f"fixtures grew to {total} bytes; keep them tiny"


@pytest.mark.parametrize("fixture, fmt", cases())
def test_v0_1_0_folder_loads_with_identical_outputs(fixture, fmt):
    meta, expected, model, x = loaded(fixture, fmt)
    names = meta["adapters"]
    assert sorted(lorakit.adapter_names(model)) == sorted(names)
    # shared_head: both adapters own a copy of "head", bit-identical (0.1.0 trained one module in place), so the
    # forward with both active is unambiguous and runs as it did in 0.1.0
    assert torch.equal(bases.forward(meta["base"], model, x), expected[f"{fmt}/all"])
    for name in names:  # switching to one adapter computes what loading it alone did in 0.1.0
        lorakit.set_active(model, name)
        assert torch.equal(bases.forward(meta["base"], model, x), expected[f"{fmt}/alone/{name}"]), name


@pytest.mark.parametrize("fixture, fmt", [case for case in cases() if len(json.loads(
    (V0_1_0 / case[0] / "fixture.json").read_text())["adapters"]) > 1])
def test_v0_1_0_folder_loads_one_adapter_by_name(fixture, fmt):
    meta = json.loads((V0_1_0 / fixture / "fixture.json").read_text())
    expected = load_file(str(V0_1_0 / fixture / "expected.safetensors"))
    for name in meta["adapters"]:
        model, x = fresh_base(meta)
        lorakit.load(model, V0_1_0 / fixture / fmt, name=name)
        assert lorakit.adapter_names(model) == [name]
        assert torch.equal(bases.forward(meta["base"], model, x), expected[f"{fmt}/alone/{name}"]), name


@pytest.mark.parametrize("fixture, fmt", cases())
def test_v0_1_0_folder_merges_to_the_same_outputs(fixture, fmt):
    meta, expected, model, x = loaded(fixture, fmt)
    key = f"{fmt}/all"
    lorakit.merge(model)
    merged = bases.forward(meta["base"], model, x)
    torch.testing.assert_close(merged, expected[key], rtol=MERGE_RTOL, atol=MERGE_ATOL)


@pytest.mark.parametrize("fixture", [f for f, fmt in cases() if fmt == "peft"])
def test_v0_1_0_peft_export_computes_what_the_lorakit_folder_does(fixture):
    """Same adapter, two formats written by 0.1.0: the same function (PiSSA's PEFT form is re-expressed on the
    original weights, so the comparison is close, not exact)."""
    expected = load_file(str(V0_1_0 / fixture / "expected.safetensors"))
    torch.testing.assert_close(expected["peft/all"], expected["lorakit/all"], rtol=MERGE_RTOL, atol=MERGE_ATOL)
