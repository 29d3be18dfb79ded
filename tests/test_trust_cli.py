"""What people see on the command line (issue 11, items 17/18): every bad input is one line starting with "error:"
and exit code 2, an unexpected failure is one "internal error:" line and exit code 1, never a traceback without
--debug; and a run without adapter.seed records the seed it drew so that --set adapter.seed=N repeats it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from test_cli import run  # the in-process CLI runner the CLI tests share


@pytest.fixture(autouse=True)
def no_progress_bars():
    """transformers' own loading bars also go to stderr; silence them so stderr holds only what lorakit says."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def one_line_error(code, err, expected_code=2, prefix="error: "):
    assert code == expected_code, err
    assert err.startswith(prefix), err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def train_argv(model_dir, data, out_dir, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out_dir),
            "--set", "train.progress=false", "--set", "train.batch_size=8", *extra]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One finished two-step classifier run per module: (model_dir, data, run folder); copied, never changed."""
    from conftest import SENTIMENT, tiny_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("trained")
    model_dir = root / "tiny-bert"
    tok = tiny_tokenizer(model_dir, [t for t, _ in SENTIMENT])
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(model_dir)
    data = root / "sentiment.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": ["negative", "positive"][y]})
                              for t, y in SENTIMENT * 8) + "\n")
    out_dir = root / "run"
    try:
        main(train_argv(model_dir, data, out_dir, "--steps", "2", "--r", "2"))
    except SystemExit as exc:
        assert not exc.code
    return model_dir, data, out_dir


@pytest.fixture
def trained(trained_once, tmp_path):
    """A private copy of the finished run: (model_dir, data, run folder)."""
    model_dir, data, out_dir = trained_once
    copy = tmp_path / "run"
    shutil.copytree(out_dir, copy)
    return model_dir, data, copy


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------------------------
# Corrupt files
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_adapter_weights_in_inspect_predict_export(trained, tmp_path, capsys):
    _, _, out_dir = trained
    adapter = out_dir / "adapter"
    truncate(adapter / "lorakit_weights.safetensors")
    for argv in (["inspect", str(adapter)], ["predict", str(adapter), "a witty film"],
                 ["export", str(adapter), "--out", str(tmp_path / "merged")]):
        code, _, err = run(argv, capsys)
        one_line_error(code, err)
        assert str(adapter) in err, err
    assert not (tmp_path / "merged").exists()


def test_truncated_checkpoint_on_resume(trained, capsys):
    model_dir, data, out_dir = trained
    for state in out_dir.glob("ckpt-*/state.safetensors"):
        truncate(state)
    code, _, err = run(train_argv(model_dir, data, out_dir, "--steps", "4", "--r", "2", "--resume", str(out_dir)),
                       capsys)
    one_line_error(code, err)
    assert str(out_dir) in err


def test_a_warning_is_one_line_too(tiny_classifier_folder, tmp_path, capsys):
    # Python's format put the warning on two lines, the second a line of lorakit's source
    model_dir, data = tiny_classifier_folder
    out_dir = tmp_path / "run"
    code, _, err = run(train_argv(model_dir, data, out_dir, "--steps", "2", "--set", "train.save_every=1"), capsys)
    assert code == 0, err
    truncate(out_dir / "ckpt-2" / "state.safetensors")
    code, _, err = run(train_argv(model_dir, data, out_dir, "--steps", "3", "--resume", str(out_dir)), capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "ckpt-2" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "resuming from" in warned[0], err
    assert not any(line.startswith(" ") or ".py:" in line for line in err.splitlines()), err


def test_a_file_where_a_folder_is_needed_is_named_as_a_file(trained, tmp_path, capsys):
    # "adapter folder 'notes.txt' does not exist" for a file that exists; "[Errno 17] File exists" for --out
    model_dir, data, out_dir = trained
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for argv in (["inspect", str(notes)], ["predict", str(notes), "a witty film"],
                 ["export", str(out_dir / "adapter"), "--out", str(notes)],
                 train_argv(model_dir, data, notes, "--steps", "1")):
        code, _, err = run(argv, capsys)
        one_line_error(code, err)
        assert f"'{notes}' is a file" in err and "does not exist" not in err and "Errno" not in err, err
        assert notes.read_text() == "keep me"


def peft_folder(tmp_path, config):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.fc.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.fc.lora_B.weight": torch.zeros(4, 2)}, str(folder / "adapter_model.safetensors"))
    return folder


PEFT_CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"]}


def test_truncated_peft_weights_in_inspect(tmp_path, capsys):
    folder = peft_folder(tmp_path, PEFT_CFG)
    code, out, err = run(["inspect", str(folder)], capsys)
    assert code == 0 and "parameters: 16" in out, err
    truncate(folder / "adapter_model.safetensors")
    code, _, err = run(["inspect", str(folder)], capsys)
    one_line_error(code, err)
    assert str(folder / "adapter_model.safetensors") in err


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '"x"'])
def test_peft_config_that_is_not_an_object_in_inspect(tmp_path, capsys, text):
    folder = peft_folder(tmp_path, PEFT_CFG)
    (folder / "adapter_config.json").write_text(text)
    code, _, err = run(["inspect", str(folder)], capsys)
    one_line_error(code, err)
    assert "adapter_config.json" in err


def test_peft_folder_without_safetensors_in_inspect(tmp_path, capsys):
    folder = peft_folder(tmp_path, PEFT_CFG)
    (folder / "adapter_model.safetensors").unlink()
    code, _, err = run(["inspect", str(folder)], capsys)
    one_line_error(code, err)
    assert "adapter_model.safetensors" in err


def test_peft_r_null_is_one_line(tmp_path, tiny_classifier_folder, capsys):
    model_dir, _ = tiny_classifier_folder
    folder = tmp_path / "peft-r-null"  # an adapter that fits the tiny BERT, but with "r": null
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({**PEFT_CFG, "r": None, "target_modules": ["query"]}))
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query."
    save_file({prefix + "lora_A.weight": torch.zeros(2, 32), prefix + "lora_B.weight": torch.zeros(32, 2)},
              str(folder / "adapter_model.safetensors"))
    code, _, err = run(["predict", str(folder), "a witty film", "--model", str(model_dir)], capsys)
    one_line_error(code, err)  # bad input (exit 2), not an "internal error"
    assert "r=None is invalid" in err and str(folder) in err


@pytest.mark.parametrize("change, words", [
    (dict(config={"r": None}), "r=None is invalid"),
    (dict(config={"lora_alpha": "big"}), "lora_alpha='big' is invalid"),
    (dict(value=float("nan")), "non-finite"),
])
def test_inspect_of_a_peft_folder_checks_what_load_checks(tmp_path, capsys, change, words):
    # inspect printed "r: None" (exit 0) for folders predict/export refuse, and passed NaN weights a lorakit-format
    # inspect refuses
    folder = peft_folder(tmp_path, {**PEFT_CFG, **change.get("config", {})})
    if "value" in change:
        save_file({"base_model.model.fc.lora_A.weight": torch.full((2, 4), change["value"]),
                   "base_model.model.fc.lora_B.weight": torch.zeros(4, 2)}, str(folder / "adapter_model.safetensors"))
    code, _, err = run(["inspect", str(folder)], capsys)
    one_line_error(code, err)
    assert words in err and str(folder) in err


def test_broken_run_file_names_it(trained, capsys):
    _, _, out_dir = trained
    for text in ["[1]", "{broken", '{"model": 5}', '{"task": "poetry"}', '{"max_length": true}']:
        (out_dir / "adapter" / "lorakit_run.json").write_text(text)
        code, _, err = run(["predict", str(out_dir / "adapter"), "a witty film"], capsys)
        one_line_error(code, err)
        assert "lorakit_run.json" in err


def test_adapter_entry_that_is_not_an_object_in_inspect(trained, capsys):
    _, _, out_dir = trained
    cfg_file = out_dir / "adapter" / "lorakit_config.json"
    meta = json.loads(cfg_file.read_text())
    meta["adapters"] = {name: [1] for name in meta["adapters"]}
    cfg_file.write_text(json.dumps(meta))
    code, _, err = run(["inspect", str(out_dir / "adapter")], capsys)
    one_line_error(code, err)
    assert "lorakit_config.json" in err


# ---------------------------------------------------------------------------------------------------------------
# Configs and overrides
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("train.steps=[1]", "steps"), ("train.lr=", "lr"), ("adapter=5", "adapter"), ("train.batch_size=2.5", "batch_size"),
    ("adapter.alpha=true", "alpha"), ("train.steps=true", "steps"), ("quantize=maybe", "quantize"),
    ("train.max_grad_norm=-1", "max_grad_norm"), ("train.optimizer=adam9", "optimizer"), ("model=[1]", "model"),
    ("adapter.d_initial=true", "d_initial"), ("train.bf16=maybe", "bf16"),
])
def test_wrong_types_fail_in_dry_run(override, key, capsys):
    code, _, err = run(["train", "--set", override, "--dry-run"], capsys)
    one_line_error(code, err)
    assert key in err


@pytest.mark.parametrize("text", ["[1, 2]", "[]", "[{\"model\": \"x\"}]"])
def test_config_file_that_is_a_list(tmp_path, capsys, text):
    cfg = tmp_path / "run.json"
    cfg.write_text(text)
    code, _, err = run(["train", str(cfg), "--dry-run"], capsys)
    one_line_error(code, err)
    assert str(cfg) in err and "mapping" in err


def test_yaml_syntax_error_is_file_line_column(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: x\nadapter:\n  r: 4\n   alpha: 3\n")
    code, _, err = run(["train", str(cfg), "--dry-run"], capsys)
    one_line_error(code, err)
    assert err.startswith(f"error: {cfg}:4:")


def test_config_folder_instead_of_file(tmp_path, capsys):
    code, _, err = run(["train", str(tmp_path), "--dry-run"], capsys)
    one_line_error(code, err)
    assert str(tmp_path) in err


def test_model_number_is_a_folder_name_and_fails_before_loading(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run(["train", "--set", "model=123", "--set", f"output_dir={out_dir}"], capsys)
    one_line_error(code, err)
    assert "'123'" in err and not out_dir.exists()


def test_batch_size_fraction_fails_before_the_model_loads(tiny_classifier_folder, tmp_path, capsys, monkeypatch):
    model_dir, data = tiny_classifier_folder
    import lorakit.train.job as job

    def no_loading(*a, **k):  # the check must come first
        raise AssertionError("model loaded")

    monkeypatch.setattr(job, "load_base", no_loading)
    code, _, err = run(train_argv(model_dir, data, tmp_path / "run", "--set", "train.batch_size=2.5"), capsys)
    one_line_error(code, err)
    assert "batch_size=2.5" in err


# ---------------------------------------------------------------------------------------------------------------
# Model and data mismatches
# ---------------------------------------------------------------------------------------------------------------
def test_unsupported_layer_target_is_one_line_and_writes_nothing(tiny_chat_folder, tmp_path, capsys):
    model_dir, data = tiny_chat_folder
    out_dir = tmp_path / "run"
    code, _, err = run(train_argv(model_dir, data, out_dir, "--steps", "1", "--set",
                                  "adapter.targets=[input_layernorm]"), capsys)
    one_line_error(code, err)
    assert "input_layernorm" in err and not out_dir.exists()


def test_classification_rows_fed_to_a_causal_lm(tiny_chat_folder, tiny_classifier_folder, tmp_path, capsys):
    lm_dir, _ = tiny_chat_folder
    _, class_data = tiny_classifier_folder
    out_dir = tmp_path / "run"
    code, _, err = run(train_argv(lm_dir, class_data, out_dir, "--steps", "1"), capsys)
    one_line_error(code, err)
    assert "classification" in err and "causal" in err and str(class_data) in err
    assert not out_dir.exists()


def test_data_with_more_labels_than_the_models_head_is_one_line(tiny_classifier_folder, tmp_path, capfd):
    # the model folder has a trained 2-label head, the data has 3 labels: transformers printed its load-report table
    # and raised a RuntimeError ("internal error"); the table goes to the process's stderr, so capture the fd
    model_dir, _ = tiny_classifier_folder
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": ["bad", "good", "meh"][i % 3]}) + "\n"
                            for i, t in enumerate(["a witty film", "a tedious mess", "dull and boring"] * 6)))
    out_dir = tmp_path / "run"
    code = 0
    try:
        main(train_argv(model_dir, data, out_dir, "--steps", "1"))
    except SystemExit as exc:
        code = exc.code
    err = capfd.readouterr().err
    one_line_error(code, err)
    assert str(model_dir) in err and str(data) in err and "3 labels" in err and "2" in err
    assert not out_dir.exists()


@pytest.mark.parametrize("suffix, content, line", [
    (".jsonl", b'{"text": "a witty film", "label": 1}\n{"text": "caf\xe9 mess", "label": 0}\n', 2),
    (".csv", b"text,label\na witty film,1\ncaf\xe9 mess,0\n", 3),
])
def test_non_utf8_data_file(tiny_classifier_folder, tmp_path, capsys, suffix, content, line):
    model_dir, _ = tiny_classifier_folder
    data = tmp_path / f"bad{suffix}"
    data.write_bytes(content)
    code, _, err = run(train_argv(model_dir, data, tmp_path / "run", "--steps", "1"), capsys)
    one_line_error(code, err)
    assert f"{data}, line {line}:" in err and "UTF-8" in err


def test_resume_with_another_optimizer_is_one_line(trained, capsys):
    model_dir, data, out_dir = trained
    code, _, err = run(train_argv(model_dir, data, out_dir, "--steps", "4", "--r", "2", "--resume", str(out_dir),
                                  "--set", "train.optimizer=sgd"), capsys)
    one_line_error(code, err)
    assert "optimizer" in err and "KeyError" not in err


# ---------------------------------------------------------------------------------------------------------------
# Internal errors and --debug
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["train", "--steps", "abc", "--dry-run"], ["'--steps'", "integer", "lorakit train --help"]),
    (["train", "--stpes", "3", "--dry-run"], ["--stpes", "--steps", "lorakit train --help"]),
    (["trian"], ["'trian'", "'train'", "lorakit --help"]),
    (["export", "some/adapter"], ["'--out'", "lorakit export --help"]),
    (["predict"], ["'adapter'", "lorakit predict --help"]),
])
def test_usage_errors_are_one_line_with_the_help_command(argv, words, capsys, monkeypatch):
    # click's own usage errors printed three lines (Usage:, Try ..., Error: ...)
    monkeypatch.setattr("sys.argv", ["lorakit"])
    code, _, err = run(argv, capsys)
    one_line_error(code, err)
    assert all(w in err for w in words), err


def test_help_and_no_arguments_still_print_the_help(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lorakit"])
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0 and "--dry-run" in out
    code, out, err = run([], capsys)
    assert code in (0, 2) and "train" in out + err and "error:" not in out + err


def test_a_model_given_as_a_relative_folder_is_found_from_any_directory(tiny_classifier_folder, tmp_path, capsys,
                                                                        monkeypatch):
    # lorakit_run.json recorded "--model tiny-bert" as given: predict from another directory failed, or loaded a
    # different folder that happens to have the same name there, without a word
    model_dir, data = tiny_classifier_folder
    monkeypatch.chdir(model_dir.parent)
    code, _, err = run(train_argv(model_dir.name, data, tmp_path / "run", "--steps", "2", "--set",
                                  "adapter.seed=0"), capsys)
    assert code == 0, err
    code, expected, err = run(["predict", str(tmp_path / "run" / "adapter"), "a witty film"], capsys)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(model_dir, elsewhere / model_dir.name)  # a decoy with the same name, other weights
    from safetensors.torch import load_file, save_file

    weights = elsewhere / model_dir.name / "model.safetensors"
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}, str(weights),
              metadata={"format": "pt"})
    monkeypatch.chdir(elsewhere)
    code, out, err = run(["predict", str(tmp_path / "run" / "adapter"), "a witty film"], capsys)
    assert code == 0, err
    assert out == expected


def test_unexpected_exception_is_one_internal_error_line(tmp_path, capsys, monkeypatch):
    import lorakit.train.job as job

    def broken(adapter):
        return {}["boom"]

    monkeypatch.setattr(job, "describe_adapter", broken)
    code, _, err = run(["inspect", str(tmp_path)], capsys)
    one_line_error(code, err, expected_code=1, prefix="internal error: ")
    assert "KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", "inspect", str(tmp_path)])


def test_any_remaining_safetensors_error_is_one_line_naming_the_input(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import lorakit.train.job as job

    def unreadable(adapter):  # what a direct safetensors read without lorakit's own check raises
        raise SafetensorError("Error while deserializing header: incomplete metadata")

    monkeypatch.setattr(job, "describe_adapter", unreadable)
    code, _, err = run(["inspect", str(tmp_path)], capsys)
    one_line_error(code, err)
    assert str(tmp_path) in err and "incomplete metadata" in err


def test_permission_error_names_the_path(tmp_path, capsys, monkeypatch):
    import lorakit.train.job as job

    def denied(adapter):
        raise PermissionError(13, "Permission denied", str(adapter))

    monkeypatch.setattr(job, "describe_adapter", denied)
    code, _, err = run(["inspect", str(tmp_path)], capsys)
    one_line_error(code, err)
    assert str(tmp_path) in err


def test_multi_line_messages_are_folded_to_one_line(tmp_path, capsys, monkeypatch):
    import lorakit.train.job as job

    def multi(adapter):
        raise ValueError("first line\n  second line")

    monkeypatch.setattr(job, "describe_adapter", multi)
    code, _, err = run(["inspect", str(tmp_path)], capsys)
    one_line_error(code, err)
    assert "first line" in err and "second line" in err


# ---------------------------------------------------------------------------------------------------------------
# Reproducible by default
# ---------------------------------------------------------------------------------------------------------------
def test_a_run_without_seed_records_the_seed_and_repeats_exactly(tiny_classifier_folder, tmp_path, capsys):
    import yaml

    model_dir, data = tiny_classifier_folder
    first = tmp_path / "first"
    code, out, err = run(train_argv(model_dir, data, first, "--steps", "2", "--r", "2"), capsys)
    assert code == 0, err
    seed = yaml.safe_load((first / "job.yaml").read_text())["adapter"]["seed"]
    assert isinstance(seed, int) and not isinstance(seed, bool)
    assert f"adapter.seed={seed}" in err and json.loads(out)["adapter_seed"] == seed
    saved = json.loads((first / "adapter" / "lorakit_config.json").read_text())
    assert [a["config"]["seed"] for a in saved["adapters"].values()] == [seed]

    again = tmp_path / "again"
    code, _, err = run(train_argv(model_dir, data, again, "--steps", "2", "--r", "2", "--set",
                                  f"adapter.seed={seed}"), capsys)
    assert code == 0, err
    a = load_file(str(first / "adapter" / "lorakit_weights.safetensors"))
    b = load_file(str(again / "adapter" / "lorakit_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the init really depends on the seed: another seed gives other weights
    other = tmp_path / "other"
    code, _, err = run(train_argv(model_dir, data, other, "--steps", "2", "--r", "2", "--set",
                                  f"adapter.seed={seed + 1}"), capsys)
    assert code == 0, err
    c = load_file(str(other / "adapter" / "lorakit_weights.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_reuses_the_recorded_seed(trained, capsys):
    import yaml

    model_dir, data, out_dir = trained
    seed = yaml.safe_load((out_dir / "job.yaml").read_text())["adapter"]["seed"]
    shutil.rmtree(out_dir / "adapter")
    code, _, err = run(train_argv(model_dir, data, out_dir, "--steps", "3", "--r", "2", "--resume", str(out_dir)),
                       capsys)
    assert code == 0, err
    assert yaml.safe_load((out_dir / "job.yaml").read_text())["adapter"]["seed"] == seed
    assert lorakit.AdapterConfig.from_json(json.dumps(next(iter(json.loads(
        (out_dir / "adapter" / "lorakit_config.json").read_text())["adapters"].values()))["config"])).seed == seed


@pytest.mark.parametrize("text", ["[1]", "{broken"])
def test_broken_model_config_names_it(tmp_path, capsys, text):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(text)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    code, _, err = run(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "r")],
                       capsys)
    one_line_error(code, err)
    assert str(model_dir / "config.json") in err and not (tmp_path / "r").exists()


def test_resume_from_a_missing_folder_fails_before_loading(trained, tmp_path, capsys):
    model_dir, data, _ = trained
    out_dir = tmp_path / "new-run"
    code, _, err = run(train_argv(model_dir, data, out_dir, "--steps", "2", "--resume", str(tmp_path / "nope")),
                       capsys)
    one_line_error(code, err)
    assert str(tmp_path / "nope") in err and not out_dir.exists()


def test_chat_with_a_classifier(trained, capsys):
    model_dir, _, out_dir = trained
    for argv in (["chat", str(out_dir / "adapter"), "--prompt", "hi"], ["chat", "--model", str(model_dir),
                                                                        "--prompt", "hi"]):
        code, _, err = run(argv, capsys)
        one_line_error(code, err)
        assert "causal" in err


def test_compare_on_rows_without_labels(trained, tmp_path, capsys):
    model_dir, _, _ = trained
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    code, _, err = run(["compare", "--model", str(model_dir), "--data", str(data), "--methods", "lora", "--steps",
                        "1", "--eval-size", "4", "--out", str(tmp_path / "report")], capsys)
    one_line_error(code, err)
    assert f"{data}, line 1" in err and "label" in err
