"""AdapterConfig: defaults, validation messages, JSON round trip, per-layer rank/alpha."""
import math

import pytest

from lorakit import AdapterConfig


def test_defaults_and_alpha_none_means_r():
    cfg = AdapterConfig()
    assert cfg.method == "lora" and cfg.r == 8 and cfg.targets == "all-linear"
    assert cfg.scaling_value("x") == 1.0  # alpha = r
    assert AdapterConfig(r=16, alpha=32).scaling_value() == 2.0


def test_rslora_scaling_is_alpha_over_sqrt_r():
    cfg = AdapterConfig(r=16, alpha=8, scaling="rslora")
    assert cfg.scaling_value() == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("method", "lorax", "lora"),
        ("r", 0, "integer >= 1"),
        ("r", 2.5, "integer >= 1"),
        ("alpha", -1.0, "positive"),
        ("dropout", 1.0, "[0, 1)"),
        ("scaling", "sqrt", "standard, rslora"),
        ("init", "xavier", "kaiming"),
        ("targets", 5, "all-linear"),
        ("targets", "(", "regex"),
        ("modules_to_save", "classifier", "list"),
        ("rank_pattern", {"q": 0}, "positive"),
        ("seed", "1", "integer"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as err:
        AdapterConfig(**{field: value})
    msg = str(err.value)
    assert field in msg and repr(value)[:10] in msg and allowed in msg


def test_json_round_trip_and_unknown_fields():
    cfg = AdapterConfig(method="lora", r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                        alpha_pattern={"v_proj": 3.0}, modules_to_save=["lm_head"], seed=7, dropout=0.1)
    again = AdapterConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown field"):
        AdapterConfig.from_dict({"r": 4, "rank": 3})


def test_rank_and_alpha_patterns_by_suffix_and_regex():
    cfg = AdapterConfig(r=8, rank_pattern={"q_proj": 2, r".*\.1\.mlp\..*": 4}, alpha_pattern={"q_proj": 6.0})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.1.mlp.up_proj") == 4
    assert cfg.rank_for("model.layers.0.mlp.up_proj") == 8
    assert cfg.scaling_value("model.layers.0.self_attn.q_proj") == 3.0
    assert cfg.scaling_value("model.layers.1.mlp.up_proj") == 1.0  # alpha defaults to the layer's rank
