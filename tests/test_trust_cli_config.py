"""Strict config checks (issue 11, items 17/18): every field of AdapterConfig, TrainConfig and JobConfig is
type-checked, so a wrong value is one ValueError naming the field, never a silent acceptance or another exception."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import AdapterConfig
from lorakit.methods import METHODS
from lorakit.train.data import DataError, load_records
from lorakit.train.job import JobConfig
from lorakit.train.trainer import TrainConfig

ADAPTER_FIELDS = [f.name for f in dataclasses.fields(AdapterConfig)]
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
JOB_FIELDS = [f.name for f in dataclasses.fields(JobConfig)]

# Values of the wrong type for (nearly) every field; JSON-like, as configs hold.
JUNK = [None, True, False, 0, -1, 1, 3, 2.5, float("nan"), float("inf"), -0.5, "", "x", "8", "1e-3", "maybe", [],
        [1], ["q_proj"], [[0, 1.0]], {}, {"q": 1}, {"q": "b"}, {1: 2}]


# ---------------------------------------------------------------------------------------------------------------
# AdapterConfig
# ---------------------------------------------------------------------------------------------------------------
NUMBER_FIELDS = ["r", "alpha", "dropout", "pissa_niter", "loftq_iter", "d_initial", "target_r", "total_steps",
                 "t_init", "t_final", "delta_t", "beta1", "beta2", "orth_reg", "sora_xi", "sora_lr",
                 "drop_fraction", "drop_threshold", "drop_top_n", "delta_lambda", "delta_start", "seed"]


@pytest.mark.parametrize("field", NUMBER_FIELDS)
@pytest.mark.parametrize("value", [True, False])
def test_adapter_bools_are_not_numbers_for_any_method(field, value):
    # lora ignores the method-specific fields, which is exactly where a bool used to slip through
    with pytest.raises(ValueError, match=rf"AdapterConfig\.{field}={value!r}"):
        AdapterConfig(method="lora", **{field: value})


@pytest.mark.parametrize("field, value", [
    ("dora_detach_norm", "yes"), ("save_projection", 1), ("d_initial", "0.1"), ("sora_schedule", "0.1"),
    ("drop_selected", "layer"), ("final_ranks", [1]), ("alpha_pattern", {"q": float("inf")}),
    ("alpha_pattern", {"q": True}), ("rank_pattern", {"q": True}), ("modules_to_save", 5),
    ("modules_to_save", None), ("method", ["lora"]), ("method", 5), ("scaling", None), ("init", ["pissa"]),
    ("beta1", float("nan")), ("orth_reg", float("inf")), ("delta_lambda", "2"), ("seed", 2**70),
    ("exclude", 3), ("targets", ["q_proj", ""]),
])
def test_adapter_every_field_type_checked_for_lora(field, value):
    with pytest.raises(ValueError) as err:
        AdapterConfig(**{"method": "lora", field: value})
    assert f"AdapterConfig.{field}=" in str(err.value)


def test_adapter_valid_values_still_pass():
    cfg = AdapterConfig(method="lora", r=4, alpha=8, dropout=0, seed=3, d_initial=1, sora_lr=None, beta1=0.5,
                        drop_top_n=None, final_ranks={"a.b": 0}, sora_schedule=[[0, 0.1]])
    assert cfg.alpha == 8 and cfg.d_initial == 1
    assert AdapterConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("data", [[1, 2], "r=4", None, 5, {1: 2}, {"r": 4, 7: 1}])
def test_adapter_from_dict_refuses_non_mappings_and_odd_keys(data):
    with pytest.raises(ValueError, match="AdapterConfig"):
        AdapterConfig.from_dict(data)


def test_adapter_from_json_not_an_object():
    with pytest.raises(ValueError, match="AdapterConfig"):
        AdapterConfig.from_json("[1, 2]")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(METHODS)),
       values=st.dictionaries(st.sampled_from(ADAPTER_FIELDS), st.sampled_from(JUNK), min_size=1, max_size=4))
def test_property_adapter_config_is_valid_or_one_value_error(method, values):
    values = {"method": method, **values}
    try:
        cfg = AdapterConfig.from_dict(values)
    except ValueError as exc:  # anything else (TypeError, KeyError, AttributeError...) fails the test
        msg = str(exc)
        assert any(k in msg for k in values), msg  # names one of the fields it was given
        return
    assert AdapterConfig.from_json(cfg.to_json()) == cfg  # a config that validates is a sane JSON value


# ---------------------------------------------------------------------------------------------------------------
# TrainConfig
# ---------------------------------------------------------------------------------------------------------------
INT_FIELDS = ["steps", "batch_size", "grad_accum", "warmup_steps", "seed", "eval_every", "log_every", "save_every",
              "keep_last"]
BOOL_FIELDS = ["bf16", "gradient_checkpointing", "progress", "tensorboard", "group_by_length"]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, 2.5, "two", [1], None, "", {}])
def test_train_int_fields_refuse_bools_fractions_and_junk(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["maybe", 1, 0, None, "true"])
def test_train_bool_fields_refuse_non_bools(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("lr", True), ("lr", None), ("lr", float("nan")), ("lr", float("inf")), ("lr", [1e-3]), ("lr", "fast"),
    ("weight_decay", -0.1), ("weight_decay", True), ("weight_decay", float("nan")),
    ("loraplus_ratio", 0), ("loraplus_ratio", True), ("loraplus_ratio", "x"),
    ("max_grad_norm", -1), ("max_grad_norm", 0), ("max_grad_norm", float("nan")), ("max_grad_norm", True),
    ("optimizer", "adam9"), ("optimizer", 5), ("schedule", None), ("distributed", ["ddp"]),
    ("output_dir", 5), ("output_dir", ""), ("resume", ["a"]), ("seed", 2**70),
])
def test_train_other_fields(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**{field: value})


def test_train_negative_max_grad_norm_names_the_fix():
    with pytest.raises(ValueError, match="max_grad_norm=-1.*None"):
        TrainConfig(max_grad_norm=-1)


def test_train_coerces_what_is_unambiguous():
    cfg = TrainConfig(steps=4.0, lr="2e-4", batch_size="8", max_grad_norm=None, optimizer="paged_adamw_8bit",
                      loraplus_ratio=16)
    assert cfg.steps == 4 and isinstance(cfg.steps, int)
    assert cfg.lr == 2e-4 and cfg.batch_size == 8 and cfg.max_grad_norm is None and cfg.loraplus_ratio == 16


@settings(max_examples=40, deadline=None)
@given(values=st.dictionaries(st.sampled_from(TRAIN_FIELDS), st.sampled_from(JUNK), min_size=1, max_size=3))
def test_property_train_config_is_valid_or_one_value_error(values):
    try:
        cfg = TrainConfig(**values)
    except ValueError as exc:
        assert any(f"TrainConfig.{k}=" in str(exc) for k in values), str(exc)
        return
    for f in dataclasses.fields(cfg):  # whatever was accepted is a JSON value of the declared kind
        value = getattr(cfg, f.name)
        assert not (isinstance(value, float) and not math.isfinite(value)), (f.name, value)
        json.dumps(value)


# ---------------------------------------------------------------------------------------------------------------
# JobConfig
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("quantize=maybe", "quantize"), ("packing=1", "packing"), ("task=5", "task"), ("format=[1]", "format"),
    ("val_fraction=[1]", "val_fraction"), ("val_fraction=true", "val_fraction"), ("max_length=2.5", "max_length"),
    ("max_length=true", "max_length"), ("max_length=1", "max_length"), ("adapter=5", "adapter"),
    ("train=[1]", "train"), ("output_dir=[1]", "output_dir"), ("data={a: 1}", "data"), ("model=[x]", "model"),
    ("train.steps=[1]", "steps"), ("train.lr=", "lr"), ("train.batch_size=2.5", "batch_size"),
    ("adapter.alpha=true", "alpha"), ("train.steps=true", "steps"), ("train.max_grad_norm=-1", "max_grad_norm"),
])
def test_job_overrides_of_the_wrong_type_fail_before_anything_loads(override, key):
    with pytest.raises(ValueError) as err:
        JobConfig.from_sources(None, [override])
    assert key in str(err.value)


def test_job_model_given_as_a_number_in_yaml_says_quote_it(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: 123\n")
    with pytest.raises(ValueError, match="model=123.*quote"):
        JobConfig.from_sources(cfg)


def test_job_override_of_a_path_key_keeps_the_text():
    # --model 123 / --output-dir 2024 are folder names, not numbers
    job = JobConfig.from_sources(None, ["model=123", "output_dir=2024", "train.resume=7"])
    assert job.model == "123" and job.output_dir == "2024" and job.train["resume"] == "7"


@pytest.mark.parametrize("text", ["[1, 2]", "[]", '"a string"', "5"])
def test_job_config_file_that_is_not_a_mapping(tmp_path, text):
    cfg = tmp_path / "run.json"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=rf"{cfg.name}.*mapping"):
        JobConfig.from_sources(cfg)


def test_job_yaml_syntax_error_is_one_line_with_file_line_column(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: x\nadapter:\n  r: 4\n   alpha: 3\n")
    with pytest.raises(ValueError) as err:
        JobConfig.from_sources(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{cfg}:4:") and "\n" not in msg


@pytest.mark.parametrize("text, line, key", [
    ("train: {steps: 3}\nmodel: x\ntrain: {lr: 1.0e-3}\n", 3, "train"),
    ("adapter:\n  r: 4\n  alpha: 8\n  r: 16\n", 4, "r"),
    ('{"train": {"steps": 3, "steps": 4}}', 1, "steps"),
])
def test_job_yaml_duplicate_key_is_refused_not_silently_replaced(tmp_path, text, line, key):
    # PyYAML keeps the last of two equal keys: "train: {steps: 3}" then "train: {lr: ...}" dropped steps silently
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as err:
        JobConfig.from_sources(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{cfg}:{line}:") and f"'{key}'" in msg and "twice" in msg and "\n" not in msg


def test_job_yaml_merge_keys_may_still_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  <<: {steps: 3, lr: 1.0e-3}\n  steps: 5\n")
    train = JobConfig.from_sources(cfg).train
    assert train["steps"] == 5 and train["lr"] == 1e-3


def test_job_yaml_reads_exponent_numbers_as_numbers(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("adapter: {method: sora, sora_xi: 1e-4}\ntrain: {lr: 2e-4}\n")
    job = JobConfig.from_sources(cfg)
    assert job.adapter["sora_xi"] == 1e-4 and job.train["lr"] == 2e-4


def test_job_config_not_utf8(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(b"model: x\ndata: \xff\xfe\n")
    with pytest.raises(ValueError, match=rf"{cfg.name}.*UTF-8"):
        JobConfig.from_sources(cfg)


@settings(max_examples=40, deadline=None)
@given(items=st.lists(st.tuples(
    st.sampled_from(JOB_FIELDS + [f"adapter.{f}" for f in ADAPTER_FIELDS] + [f"train.{f}" for f in TRAIN_FIELDS]),
    st.sampled_from(JUNK)), min_size=1, max_size=3))
def test_property_job_config_is_valid_or_one_value_error(items, tmp_path_factory):
    # the same values once through a YAML file and once as --set overrides
    import yaml

    raw: dict = {}
    items = copy.deepcopy(items)  # JUNK's dicts are shared between examples: nesting into one must not mutate it
    for key, value in items:
        section, _, sub = key.partition(".")
        if sub:
            raw.setdefault(section, {})
            if isinstance(raw[section], dict):
                raw[section][sub] = value
        else:
            raw[key] = value
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    overrides = [f"{k}={json.dumps(v)}" for k, v in items]
    for source, sets in ((path, []), (None, overrides)):
        try:
            job = JobConfig.from_sources(source, sets)
        except ValueError as exc:
            msg = str(exc)
            assert any(k.rpartition(".")[2] in msg for k, _ in items), msg
            continue
        yaml.safe_load(job.to_yaml())  # what validated can be written as job.yaml


# ---------------------------------------------------------------------------------------------------------------
# Data files that are not UTF-8
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, content, line", [
    (".jsonl", b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n', 2),
    (".csv", b"text,label\nok,1\nfine,0\ncaf\xe9,0\n", 4),
    (".json", b'[\n {"text": "ok", "label": 1},\n {"text": "caf\xe9", "label": 0}\n]\n', 3),
])
def test_non_utf8_data_names_file_line_and_fix(tmp_path, suffix, content, line):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_records(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line {line}:") and "UTF-8" in msg


def test_utf8_with_bom_still_reads(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\n')
    assert load_records(path)[0]["text"] == "café"


def test_data_folder_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_records(tmp_path)
