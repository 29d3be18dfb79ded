"""The lorakit command end to end on tiny local models: train, inspect, predict, export, chat, compare, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from lorakit.cli import main


def run(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_resolves_yaml_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: some/folder\nadapter: {method: lora, r: 4}\ntrain: {steps: 7, lr: 1.0e-3}\n")
    code, out, _ = run(["train", str(cfg), "--set", "adapter.r=16", "--set", "train.lr=2e-4", "--steps", "9",
                        "--dry-run"], capsys)
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["model"] == "some/folder"
    assert resolved["adapter"] == {"method": "lora", "r": 16}
    assert resolved["train"]["lr"] == 2e-4 and resolved["train"]["steps"] == 9
    assert resolved["train"]["batch_size"] == 16  # defaults fill what the file leaves out


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "adapter.method=nope", "--dry-run"], "AdapterConfig.method='nope' is invalid"),
    (["train", "missing.yaml", "--dry-run"], "config file 'missing.yaml' does not exist"),
    (["train", "--set", "train.warmup=3", "--dry-run"], "unknown train key(s) ['warmup']"),
    (["train", "--set", "colour=3", "--dry-run"], "unknown config key 'colour'"),
    (["inspect", "no/such/folder"], "does not exist"),
    (["compare", "--methods", "lora,magic"], "unknown contender(s) ['magic']"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_data_names_file_and_line(tmp_path, tiny_classifier_folder, capsys):
    model_dir, data = tiny_classifier_folder
    lines = data.read_text().splitlines()
    lines[2] = '{"text": "broken", "label": '
    data.write_text("\n".join(lines) + "\n")
    code, _, err = run(["train", "--model", str(model_dir), "--data", str(data), "--steps", "1"], capsys)
    assert code == 2 and f"{data}" in err and "line 3" in err and "Traceback" not in err


def test_subprocess_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--set", "adapter.r=-1", "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "AdapterConfig.r=-1" in proc.stderr


def test_train_inspect_predict_export_classifier(tmp_path, tiny_classifier_folder, capsys):
    model_dir, data = tiny_classifier_folder
    out_dir = tmp_path / "run"
    code, out, err = run(["train", "--model", str(model_dir), "--data", str(data), "--method", "lora", "--r", "4",
                          "--steps", "6", "--lr", "1e-2", "--batch-size", "8", "--output-dir", str(out_dir),
                          "--set", "train.progress=false"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 6 and "accuracy" in summary["eval"]
    adapter = out_dir / "adapter"
    assert (adapter / "lorakit_weights.safetensors").exists() and (out_dir / "log.jsonl").exists()

    code, out, _ = run(["inspect", str(adapter)], capsys)
    assert code == 0 and "method=lora" in out and "r=4" in out and "lorakit_weights.safetensors" in out

    code, out, _ = run(["predict", str(adapter), "a gorgeous witty film", "dull and boring"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("negative", "positive") for line in lines)

    merged = tmp_path / "merged"
    code, _, err = run(["export", str(adapter), "--out", str(merged)], capsys)
    assert code == 0, err
    # plain transformers, with lorakit made unimportable, loads the merged folder and agrees with the adapter
    script = ("import sys; sys.modules['lorakit'] = None\n"
              "import torch; from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
              f"p = {str(merged)!r}; t = AutoTokenizer.from_pretrained(p)\n"
              "m = AutoModelForSequenceClassification.from_pretrained(p).eval()\n"
              "with torch.no_grad(): print(m(**t(['a gorgeous witty film'], return_tensors='pt')).logits.tolist())")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain_logits = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    from lorakit.train.job import load_adapted

    adapted, tok, _ = load_adapted(adapter)
    with torch.no_grad():
        ours = adapted(**tok(["a gorgeous witty film"], return_tensors="pt")).logits
    torch.testing.assert_close(plain_logits, ours, atol=1e-5, rtol=0)


def test_train_chat_lm_and_chat_command(tmp_path, tiny_chat_folder, capsys):
    model_dir, data = tiny_chat_folder
    out_dir = tmp_path / "chat"
    code, out, err = run(["train", "--model", str(model_dir), "--data", str(data), "--method", "lora", "--steps", "4",
                          "--output-dir", str(out_dir), "--set", "train.progress=false", "--set", "max_length=32"],
                         capsys)
    assert code == 0, err
    assert "perplexity" in json.loads(out)["eval"]
    code, out, err = run(["chat", str(out_dir / "adapter"), "--prompt", "how are you", "--max-new-tokens", "4"],
                         capsys)
    assert code == 0, err and isinstance(out, str)
    code, _, err = run(["export", str(out_dir / "adapter"), "--out", str(tmp_path / "m")], capsys)
    assert code == 0 and (tmp_path / "m" / "config.json").exists()


def test_compare_writes_a_report_with_the_measured_numbers(tmp_path, tiny_classifier_folder, capsys):
    model_dir, data = tiny_classifier_folder
    out = tmp_path / "report"
    code, stdout, err = run(["compare", "--model", str(model_dir), "--data", str(data), "--methods",
                             "lora,head-only,full", "--steps", "3", "--batch-size", "8", "--eval-size", "12",
                             "--out", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["lora", "head-only", "full"]
    md = (out / "report.md").read_text()
    for r in results["rows"]:
        assert r["trainable_params"] > 0 and 0.0 <= r["accuracy"] <= 1.0 and len(r["losses"]) == 3
        assert f"| {r['name']} | {r['trainable_params']:,} |" in md and f"{r['accuracy']:.3f}" in md
    lora, head, full = results["rows"]
    assert head["trainable_params"] < lora["trainable_params"] < full["trainable_params"]
    for f in ("report.html", "loss_curves.png", "accuracy_vs_params.png"):
        assert (out / f).stat().st_size > 0


def test_compare_side_by_side_gives_the_same_numbers_as_one_at_a_time(tmp_path, tiny_classifier_folder, capsys):
    model_dir, data = tiny_classifier_folder
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"report{jobs}"
        code, _, err = run(["compare", "--model", str(model_dir), "--data", str(data), "--methods", "lora,dora",
                            "--steps", "3", "--batch-size", "8", "--eval-size", "12", "--jobs", str(jobs),
                            "--threads", "1", "--out", str(out)], capsys)
        assert code == 0, err
        results[jobs] = json.loads((out / "results.json").read_text())
        assert results[jobs]["config"]["jobs"] == jobs
    for one, two in zip(results[1]["rows"], results[2]["rows"], strict=True):
        assert one["name"] == two["name"]
        assert one["losses"] == two["losses"] and one["accuracy"] == two["accuracy"]


def test_compare_config_divides_the_cores_among_the_workers(monkeypatch):
    from lorakit import compare as compare_mod

    for cores, methods, want in [(1, 5, (1, 1)), (2, 5, (2, 1)), (2, 1, (1, 2)), (8, 5, (4, 2)), (16, 3, (3, 5))]:
        monkeypatch.setattr(compare_mod, "_cores", lambda c=cores: c)
        cfg = compare_mod.CompareConfig(methods=list(compare_mod.CONTENDERS)[:methods])
        assert (cfg.jobs, cfg.threads) == want, (cores, methods)
    cfg = compare_mod.CompareConfig(methods=["lora"], jobs=3, threads=2)
    assert (cfg.jobs, cfg.threads) == (1, 2)  # never more workers than contenders
    with pytest.raises(ValueError, match="jobs and threads"):
        compare_mod.CompareConfig(jobs=-1)
