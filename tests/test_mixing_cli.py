"""``lorakit mix`` on saved folders (lorakit's and PEFT's) of a tiny local Llama: the result equals the reference
TIES formula on the adapters' changes; bad input is one line and writes nothing."""
from __future__ import annotations

import json

import torch
from test_cli import run
from test_mixing import reference

import lorakit
from lorakit import AdapterConfig
from lorakit.model import adapted_layers

PATH = "model.layers.0.self_attn.q_proj"


def _adapter_folders(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    folders = []
    for k, fmt in enumerate(("lorakit", "peft")):
        net = AutoModelForCausalLM.from_pretrained(model_dir)
        lorakit.attach(net, AdapterConfig(r=2 + k, alpha=4, targets=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(k)
        for _, layer in adapted_layers(net):
            with torch.no_grad():
                layer.adapters["default"].B.copy_(torch.randn(layer.adapters["default"].B.shape, generator=g))
        folder = lorakit.save(net, tmp_path / f"task{k}", format=fmt)
        if fmt == "lorakit":
            (folder / "lorakit_run.json").write_text(json.dumps({"model": str(model_dir), "task": "lm"}))
        folders.append(folder)
    return folders


def _change(model_dir, folder, name):
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.load(net, folder, name=name)
    layer = net.get_submodule(PATH)
    return layer.adapters[name].delta_weight(layer)


def test_mix_command_writes_the_reference_mix_and_its_report(tmp_path, tiny_chat_folder, capsys):
    model_dir, _ = tiny_chat_folder
    a, b = _adapter_folders(tmp_path, model_dir)
    out = tmp_path / "mixed"
    code, stdout, err = run(["mix", str(a), str(b), "--weights", "0.7,0.3", "--how", "ties", "--density", "0.5",
                             "--model", str(model_dir), "--out", str(out)], capsys)
    assert code == 0, err
    assert "ties mix of 2 adapters" in stdout and "exact" in stdout
    report = json.loads((out / "mix_report.json").read_text())
    assert report["how"] == "ties" and report["density"] == 0.5 and report["exact"]
    assert set(report["layers"]) == {p for p in report["layers"]} and len(report["layers"]) == 4
    assert json.loads((out / "lorakit_run.json").read_text())["model"] == str(model_dir)
    ref = reference("ties", [_change(model_dir, a, "x"), _change(model_dir, b, "y")], [0.7, 0.3], 0.5)
    got = _change(model_dir, out, "m")
    assert ref.abs().max() > 1e-3
    assert torch.allclose(got, ref, atol=1e-5)


def test_mix_command_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, tiny_chat_folder, capsys):
    model_dir, _ = tiny_chat_folder
    a, b = _adapter_folders(tmp_path, model_dir)
    out = tmp_path / "mixed"
    other = tmp_path / "other_base"
    other.mkdir()
    (tmp_path / "c").mkdir()
    for f in a.iterdir():
        (tmp_path / "c" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "c" / "lorakit_run.json").write_text(json.dumps({"model": str(other), "task": "lm"}))
    cases = [
        (["mix", str(a), str(b), "--how", "dare_ties", "--density", "0.5"], "give --seed N"),
        (["mix", str(a), str(b), "--weights", "1,2,3"], "3 value(s) for 2 adapter(s)"),
        (["mix", str(a), str(b), "--how", "ties", "--density", "1.5"], "0 < density <= 1"),
        (["mix", str(a), str(tmp_path / "c")], "different base models"),
        (["mix", str(a), str(tmp_path / "nope")], "do not exist"),
        (["mix", str(a), str(b), "--how", "ties", "--density", "0.5", "--rank", "0"], "rank=0 is invalid"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        code, _, err = run(argv + ["--model", str(model_dir), "--out", str(out)], capsys)
        assert code == 2, (argv, err)
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], err
        assert not out.exists()
