"""The bake-off answers questions (issue 15): variants and sweeps, seeds and paired noise, the recommendations, the
results.json schema, readable plots, resume, the causal-LM task; bad input is one line before anything trains."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from test_cli import run  # the in-process CLI runner the CLI tests share

from lorakit import compare as cmp
from lorakit.compare import (TASKS, CompareConfig, contender_for, expand_sweep, paired_difference, parse_bytes,
                             parse_variant, recommend, write_report)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Variants and sweeps
# ---------------------------------------------------------------------------------------------------------------
def test_a_variant_overrides_its_table_entry_field_by_field():
    v = parse_variant(" dora:r=8:alpha=32.5:init=gaussian:dora_detach_norm=false:lr=1e-3 ")
    assert v.spec == "dora:r=8:alpha=32.5:init=gaussian:dora_detach_norm=false:lr=1e-3" and v.base == "dora"
    assert v.overrides == {"r": 8, "alpha": 32.5, "init": "gaussian", "dora_detach_norm": False, "lr": 1e-3}
    c = contender_for(v.spec)
    base = cmp.CONTENDERS["dora"]
    assert c.adapter_fields(50) == {**base.adapter_fields(50), "r": 8, "alpha": 32.5, "init": "gaussian",
                                    "dora_detach_norm": False}
    assert c.train == {**base.train, "lr": 1e-3} and c.cost == base.cost and c.prepare is base.prepare
    # a step-dependent entry (AdaLoRA's schedule) keeps depending on the budget under a variant
    ada = contender_for("adalora:target_r=4")
    assert ada.adapter_fields(40)["total_steps"] == 40 and ada.adapter_fields(80)["total_steps"] == 80
    assert ada.adapter_fields(40)["target_r"] == 4
    assert contender_for("qlora:r=2").quantizes_base  # the variant keeps the entry's own steps
    assert contender_for("lora") is cmp.CONTENDERS["lora"]


@pytest.mark.parametrize("spec, message", [
    ("lora:rank=4", "variant 'lora:rank=4': unknown field 'rank'"),
    ("lora:r=0", "contender 'lora:r=0' is invalid: AdapterConfig.r=0 is invalid"),
    ("vera:init=pissa", "AdapterConfig.init='pissa' is not available for method='vera'"),
    ("lora:r", "'r' is not field=value"),
    ("lora:r=4:r=8", "sets 'r' twice"),
    ("full:r=4", "'full' is a baseline without adapter settings"),
    ("lorra", "unknown contender(s) ['lorra']"),
    ("lora:lr=-1", "TrainConfig.lr=-1 is invalid"),
])
def test_a_bad_variant_is_refused_when_the_config_is_built(spec, message):
    with pytest.raises(ValueError) as info:
        CompareConfig(methods=["lora", spec])
    assert message in str(info.value)


def test_a_sweep_expands_each_adapter_contender_and_keeps_the_reference():
    got = expand_sweep(["lora", "dora", "full", "vera:r=64"], "r=1,2,8")
    # lora:r=8 is lora itself (not trained twice); the baseline and a variant that already sets r stay as they are
    assert got == ["lora", "lora:r=1", "lora:r=2", "dora:r=1", "dora:r=2", "dora:r=8", "full", "vera:r=64"]
    assert expand_sweep(got, "r=1,2,8") == got  # idempotent (a worker rebuilding the config expands nothing)
    assert expand_sweep(["lora"], "init=kaiming,pissa") == ["lora", "lora:init=pissa"]
    cfg = CompareConfig(methods=["lora", "dora"], sweep="r=1,2")
    assert cfg.methods == ["lora", "lora:r=1", "lora:r=2", "dora:r=1", "dora:r=2"]
    assert cmp.sweep_value({"settings": {"adapter": contender_for("dora:r=2").adapter_fields(50)}}, "r") == 2


@pytest.mark.parametrize("sweep, message", [
    ("r=0,4", "contender 'lora:r=0' is invalid: AdapterConfig.r=0 is invalid"),
    ("rank=1,2", "sweep 'rank=1,2': unknown field 'rank'"),
    ("r=", "sweep 'r=' is invalid"),
    ("init=pissa", "AdapterConfig.init='pissa' is not available for method='vera'"),
])
def test_a_sweep_value_the_method_rejects_is_refused_before_training(sweep, message):
    with pytest.raises(ValueError) as info:
        CompareConfig(methods=["lora", "vera"], sweep=sweep)
    assert message in str(info.value)


def test_memory_sizes_parse_with_decimal_and_binary_units():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes("500MB") == 500 * 10**6 and parse_bytes(1234) == 1234 and parse_bytes("64k") == 64000
    for bad in ("2 GBs", "-1GB", "lots", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def test_the_task_sets_its_defaults():
    lm = CompareConfig(task="causal-lm")
    assert (lm.model, lm.data, lm.methods) == ("smollm2", "chatterbot", ["lora", "dora", "qlora", "vera"])
    assert lm.steps == TASKS["causal-lm"].steps and lm.batch_size == TASKS["causal-lm"].batch_size
    cls = CompareConfig()
    assert (cls.model, cls.data, cls.steps, cls.batch_size, cls.max_length, cls.eval_size) == \
        ("minilm", "movie_reviews", 50, 32, 40, 500)  # the default run is unchanged
    assert cls.methods == list(cmp.CONTENDERS)[:len(cls.methods)] and "head-only" in cls.methods
    with pytest.raises(ValueError, match="task 'regression' is invalid"):
        CompareConfig(task="regression")
    with pytest.raises(ValueError, match="seeds=0 is invalid"):
        CompareConfig(seeds=0)


# ---------------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------------
def test_paired_difference_is_a_paired_t_test():
    a = [0.812, 0.806, 0.820, 0.809]
    b = [0.800, 0.801, 0.811, 0.806]
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    got = paired_difference(a, b)
    assert got["n"] == n and got["df"] == n - 1
    assert got["mean"] == pytest.approx(mean) and got["sd"] == pytest.approx(sd) and got["se"] == pytest.approx(se)
    assert got["t"] == pytest.approx(mean / se)
    assert got["margin"] == pytest.approx(3.182 * se)  # t(0.975, df=3)
    assert got["beyond_noise"] == (abs(mean) > 3.182 * se) == (abs(mean / se) > 3.182)
    # the same mean difference with noisier pairs is not beyond the noise
    noisy = paired_difference([0.83, 0.79, 0.84, 0.79], [0.80, 0.80, 0.80, 0.80])
    assert noisy["mean"] == pytest.approx(0.0125) and noisy["beyond_noise"] is False
    assert paired_difference([0.8], [0.7])["beyond_noise"] is None  # one pair: the noise is unknown


def test_t_quantiles_match_scipy():
    from scipy.stats import t

    for df in (1, 2, 3, 5, 10, 30):
        assert cmp.t_critical(df) == pytest.approx(t.ppf(0.975, df), abs=1e-3)
    for df in (31, 45, 200, 10_000):
        assert cmp.t_critical(df) == pytest.approx(t.ppf(0.975, df), abs=1e-3)


def test_one_seed_accuracy_uses_the_binomial_noise_of_the_held_out_rows():
    p1, p2, n = 0.82, 0.80, 500
    se = math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)
    got = cmp.binomial_difference(p1, p2, n)
    assert got["se"] == pytest.approx(se) and got["margin"] == pytest.approx(1.96 * se)
    assert got["beyond_noise"] is False  # 2 points on 500 rows is noise
    assert cmp.binomial_difference(0.86, 0.78, n)["beyond_noise"] is True


# ---------------------------------------------------------------------------------------------------------------
# Recommendations on synthetic results
# ---------------------------------------------------------------------------------------------------------------
def synthetic_rows(seeds=(0, 1, 2)):
    """Four contenders with per-seed runs: dora clearly best, rslora close to dora; qlora smallest, vera fastest
    and fewest parameters."""
    spec = {  # name: (accuracies per seed, train memory, tokens/s per seed, trainable)
        "lora": ([0.800, 0.805, 0.810], 900e6, [1000, 1010, 990], 300_000),
        "dora": ([0.830, 0.836, 0.840], 950e6, [800, 805, 795], 320_000),
        "rslora": ([0.829, 0.830, 0.842], 900e6, [990, 1000, 1000], 300_000),
        "qlora": ([0.795, 0.806, 0.800], 500e6, [700, 690, 705], 300_000),
        "vera": ([0.760, 0.770, 0.765], 880e6, [1500, 1490, 1510], 30_000),
    }
    runs = []
    for name, (accs, mem, tps, trainable) in spec.items():
        runs.append([{"name": name, "kind": "adapter", "seed": s, "accuracy": accs[k], "eval_loss": 1 - accs[k],
                      "train_memory_bytes": int(mem), "tokens_per_second": float(tps[k]),
                      "trainable_params": trainable, "losses": [1.0, 0.5]} for k, s in enumerate(seeds)])
    return cmp.aggregate(runs)


def test_recommendations_name_the_winner_its_figure_and_whether_its_lead_is_noise():
    rows = synthetic_rows()
    recs = {r["question"].split(" (")[0]: r for r in recommend(rows, TASKS["classification"], 500)}
    best = recs["Best quality"]
    assert best["name"] == "dora" and best["runner_up"] == "rslora"
    assert best["figure"] == pytest.approx((0.830 + 0.836 + 0.840) / 3)
    # dora vs rslora, paired over the three seeds: +0.001, +0.006, -0.002 -> within the noise
    assert best["beyond_noise"] is False and "within the noise" in best["text"]
    assert recs["Lowest training memory"]["name"] == "qlora" and recs["Lowest training memory"]["beyond_noise"]
    assert recs["Lowest training memory"]["lead"] == pytest.approx(380e6)
    fastest = recs["Fastest"]
    assert fastest["name"] == "vera" and fastest["runner_up"] == "lora" and fastest["beyond_noise"] is True
    assert recs["Fewest trainable parameters"]["name"] == "vera"
    assert recs["Fewest trainable parameters"]["figure"] == 30_000


def test_the_memory_cap_picks_the_best_that_fits_or_says_none_does():
    rows = synthetic_rows()
    capped = recommend(rows, TASKS["classification"], 500, memory_cap=parse_bytes("0.9GB"), cap_text="0.9GB")[-1]
    assert capped["question"].endswith("0.9GB") and capped["name"] == "rslora"  # dora needs 950 MB
    assert capped["runner_up"] == "lora"
    # rslora vs lora: +0.029, +0.025, +0.032 over the seeds: beyond the noise
    assert capped["beyond_noise"] is True
    none = recommend(rows, TASKS["classification"], 500, memory_cap=parse_bytes("100MB"), cap_text="100MB")[-1]
    assert none["name"] is None and "no contender trains within 100MB" in none["text"]
    assert "qlora, needs 500.0 MB" in none["text"]


def test_for_a_causal_lm_the_lowest_loss_wins():
    runs = [[{"name": n, "seed": s, "eval_loss": loss + 0.01 * s, "trainable_params": 1}
             for s in (0, 1)] for n, loss in (("lora", 2.0), ("dora", 1.9), ("vera", 2.4))]
    best = recommend(cmp.aggregate(runs), TASKS["causal-lm"], 48)[0]
    assert best["name"] == "dora" and best["runner_up"] == "lora" and best["lead"] == pytest.approx(0.1)
    assert best["beyond_noise"] is True  # the same -0.1 on both seeds: sd 0


def test_aggregate_gives_means_sds_and_keeps_every_run():
    row = synthetic_rows()[0]
    accs = [0.800, 0.805, 0.810]
    mean = sum(accs) / 3
    assert row["accuracy"] == pytest.approx(mean)
    assert row["accuracy_sd"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 2))
    assert row["seeds"] == [0, 1, 2] and [r["accuracy"] for r in row["runs"]] == accs
    assert row["trainable_params"] == 300_000 and isinstance(row["trainable_params"], int)


# ---------------------------------------------------------------------------------------------------------------
# results.json schema, report and plots
# ---------------------------------------------------------------------------------------------------------------
def documented_keys(section: str) -> tuple[set[str], set[str]]:
    """(keys, optional keys) of one table of docs/compare-results.md."""
    text = (ROOT / "docs" / "compare-results.md").read_text()
    part = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    keys, optional = set(), set()
    for line in part.splitlines():
        m = re.match(r"\| `([a-z_]+)` \| ([^|]+) \|", line)
        if m:
            keys.add(m.group(1))
            if "(optional)" in m.group(2):
                optional.add(m.group(1))
    assert keys, section
    return keys, optional


def full_results(tmp_path, n_contenders=5, seeds=(0, 1), task="classification"):
    """Results as compare() builds them, from synthetic per-seed rows carrying every key run_contender writes."""
    names = ["lora", "dora", "vera", "qlora", "full"] + [f"lora:r={2 ** k}" for k in range(n_contenders)]
    names = names[:n_contenders]
    groups = []
    for i, name in enumerate(names):
        runs = []
        for s in seeds:
            contender = contender_for(name)
            adapter = contender.adapter_fields(50)
            runs.append({
                "name": name, "kind": contender.kind, "seed": s, "steps": 50,
                "settings": {"adapter": adapter, "train": dict(contender.train), "quantize": False},
                "family": (adapter or {}).get("method", contender.kind), "base": parse_variant(name).base,
                "trainable_params": 1000 * (i + 1), "total_params": 22_700_000,
                "trainable_pct": 100 * 1000 * (i + 1) / 22.7e6, "accuracy": 0.8 - 0.01 * i + 0.002 * s,
                "eval_loss": 0.4 + 0.01 * i, "perplexity": None, "seconds_per_step": 0.5, "wall_seconds": 25.0,
                "tokens_per_second": 900.0 - i, "peak_rss_bytes": 10**9, "artifact_bytes": 10_000,
                "model_weight_bytes": 90_000_000, "trainable_bytes": 4000 * (i + 1),
                "optimizer_state_bytes": 8000 * (i + 1), "activation_bytes_per_token": 50_000.0,
                "train_memory_bytes": 95_000_000 + i, "losses": [0.7 - 0.01 * k - 0.02 * i for k in range(50)]})
        groups.append(runs)
    cfg = CompareConfig(methods=names, seeds=len(seeds), task=task, memory_cap="95000002B")
    rows = cmp.aggregate(groups)
    return {"schema_version": cmp.SCHEMA_VERSION, "config": cmp.asdict(cfg), "rows": rows, "skipped": {},
            "comparisons": cmp.reference_comparisons(rows, cfg.spec, cfg.eval_size),
            "recommendations": recommend(rows, cfg.spec, cfg.eval_size, parse_bytes(cfg.memory_cap), cfg.memory_cap),
            "total_seconds": 60.0, "date": "2026-11-29 23:00", "environment": cmp._environment()}


def test_results_json_has_exactly_the_documented_schema(tmp_path):
    results = full_results(tmp_path)
    write_report(results, tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    top, _ = documented_keys("Top level")
    assert set(saved) == top
    assert set(saved["config"]) == documented_keys("`config`")[0]
    row_keys, optional = documented_keys("`rows[]`")
    for row in saved["rows"]:
        plain = {k for k in row if not k.endswith("_sd")}
        assert plain - row_keys == set() and row_keys - optional - plain == set(), row["name"]
        assert {k[:-3] for k in row if k.endswith("_sd")} <= set(cmp.NUMERIC_KEYS)
        for run in row["runs"]:
            assert set(run) - row_keys - {"seed", "lr_tried"} == set() and "seed" in run
    comp_keys, _ = documented_keys("`comparisons{name}` (and `recommendations[].noise`)")
    assert saved["comparisons"] and all(set(c) == comp_keys for c in saved["comparisons"].values())
    rec_keys, rec_optional = documented_keys("`recommendations[]`")
    for rec in saved["recommendations"]:
        assert set(rec) - rec_keys == set() and rec_keys - rec_optional - set(rec) == set()
    # within 95,000,002 bytes of training memory: lora, dora and vera; lora is the most accurate of them
    assert saved["recommendations"][-1]["name"] == "lora" and saved["recommendations"][-1]["runner_up"] == "dora"


def test_the_report_shows_the_recommendations_the_comparison_and_the_costs(tmp_path):
    results = full_results(tmp_path)
    write_report(results, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("## Which method should I use?") < md.index("## Results")
    for rec in results["recommendations"]:
        assert rec["text"] in md
    dora = next(r for r in results["rows"] if r["name"] == "dora")
    assert f"| dora | 2,000 | {dora['trainable_pct']:.3f}% | {dora['accuracy']:.3f} ± {dora['accuracy_sd']:.3f} |" in md
    assert "## Differences from LoRA" in md and "| dora | -1.0 points |" in md
    assert "| qlora | 90.0 MB | 16.0 KB | 32.0 KB | 50.0 KB | 95.0 MB | 897 | 1.0 GB |" in md


def test_labels_do_not_overlap_with_forty_contenders():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    # forty points, most in two tight clusters (same parameter count, accuracies a few tenths of a point apart)
    xs = [338_690] * 18 + [31_362] * 12 + [10 ** (3 + k / 3) for k in range(10)]
    ys = [0.80 + 0.001 * k for k in range(18)] + [0.78 + 0.0015 * k for k in range(12)] + [0.7 + 0.01 * k
                                                                                           for k in range(10)]
    labels = [f"lora:r={k}" for k in range(18)] + [f"vera:r={k}" for k in range(12)] + [f"m{k}" for k in range(10)]
    ax.scatter(xs, ys)
    ax.set_xscale("log")
    texts = cmp.place_labels(ax, xs, ys, labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the label itself, not its leader line
    overlapping = [(labels[i], labels[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                   if boxes[i].overlaps(boxes[j])]
    plt.close(fig)
    assert overlapping == []


def test_the_loss_plot_has_one_panel_per_family_with_the_reference_in_each(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, path, *args, **kwargs):
        saved[Path(path).name] = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    results = full_results(tmp_path, n_contenders=9)
    cmp._plots(results["rows"], tmp_path, TASKS["classification"])
    panels = saved["loss_curves.png"]
    families = list(dict.fromkeys(r["family"] for r in results["rows"]))
    assert [ax.get_title() for ax in panels] == families
    for ax in panels:
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels[0] == "lora (reference)"
    lora_panel = panels[families.index("lora")]
    assert {line.get_label() for line in lora_panel.get_lines()} >= {f"lora:r={2 ** k}" for k in range(4)}
    plt.close("all")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, before anything trains
# ---------------------------------------------------------------------------------------------------------------
run_cli = run  # test_cli's in-process runner: (exit code, stdout, stderr)


def test_bad_input_is_one_line_before_any_training(tmp_path, tiny_classifier_folder, tiny_chat_folder, capsys):
    model_dir, data = tiny_classifier_folder
    lm_dir, chat = tiny_chat_folder
    out = tmp_path / "report"
    cases = [
        (["--model", str(model_dir), "--data", str(data), "--methods", "lora,lora:rank=4"], "unknown field 'rank'"),
        (["--model", str(model_dir), "--data", str(data), "--methods", "lora", "--sweep", "r=0,2"],
         "AdapterConfig.r=0 is invalid"),
        (["--model", str(model_dir), "--data", str(chat), "--methods", "lora"], "pass --task causal-lm"),
        (["--task", "causal-lm", "--model", str(lm_dir), "--data", str(data), "--methods", "lora",
          "--eval-size", "4"], "use --task classification"),
        (["--task", "causal-lm", "--model", str(model_dir), "--data", str(chat), "--methods", "lora"],
         "is not a causal LM"),
        (["--task", "causal-lm", "--model", str(lm_dir), "--data", str(chat), "--methods", "lora,head-only",
          "--eval-size", "4"], "contender 'head-only' trains a new classification head"),
        (["--model", str(model_dir), "--data", str(data), "--methods", "lora", "--memory-cap", "1KB",
          "--eval-size", "12"], "--memory-cap 1KB is below what any contender can need"),
        (["--model", str(model_dir), "--data", str(data), "--methods", "lora", "--memory-cap", "lots"],
         "memory size 'lots' is invalid"),
    ]
    for args, message in cases:
        code, _, err = run_cli(["compare", *args, "--out", str(out)], capsys)
        assert code == 2 and err.startswith("error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # nothing trained, nothing written


# ---------------------------------------------------------------------------------------------------------------
# End to end (slow): tiny models, real worker processes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_classification_with_seeds_a_variant_and_resume(tmp_path, tiny_classifier_folder, capsys):
    model_dir, data = tiny_classifier_folder
    out = tmp_path / "report"
    argv = ["compare", "--model", str(model_dir), "--data", str(data), "--methods", "lora,lora:r=2,qlora",
            "--seeds", "2", "--steps", "3", "--batch-size", "8", "--eval-size", "12", "--out", str(out)]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["lora", "lora:r=2", "qlora"]
    lora, small, qlora = results["rows"]
    for r in results["rows"]:
        assert r["seeds"] == [0, 1] and [run["seed"] for run in r["runs"]] == [0, 1]
        accs = [run["accuracy"] for run in r["runs"]]
        assert r["accuracy"] == pytest.approx(sum(accs) / 2) and "accuracy_sd" in r
        assert r["tokens_per_second"] > 0 and r["activation_bytes_per_token"] > 0
        # AdamW: two moments per trainable value (the step counters are scalars)
        assert 2 * r["trainable_bytes"] <= r["optimizer_state_bytes"] <= 2 * r["trainable_bytes"] + 64 * 64
        assert r["train_memory_bytes"] > r["model_weight_bytes"] + 2 * r["trainable_bytes"]
    assert small["settings"]["adapter"]["r"] == 2 and small["trainable_params"] < lora["trainable_params"]
    assert qlora["model_weight_bytes"] < lora["model_weight_bytes"]  # the 4-bit base shows
    comp = results["comparisons"]["lora:r=2"]
    d = [a["accuracy"] - b["accuracy"] for a, b in zip(small["runs"], lora["runs"])]
    assert comp["how"] == "paired over seeds" and comp["mean"] == pytest.approx(sum(d) / 2)
    assert "## Which method should I use?" in stdout and "lora:r=2" in stdout
    assert len(list((out / "runs").glob("*.json"))) == 6
    # resume: every run is reused, nothing trains, the numbers are the same
    code, _, err = run_cli(argv + ["--resume"], capsys)
    assert code == 0, err
    assert err.count("finished in an earlier run (resumed)") == 6 and "training 0 run(s)" in err
    again = json.loads((out / "results.json").read_text())
    assert [r["runs"] for r in again["rows"]] == [r["runs"] for r in results["rows"]]
    # changed settings: the saved runs do not match, so they train again
    code, _, err = run_cli(argv + ["--resume", "--seed", "1"], capsys)
    assert code == 0 and "training 6 run(s)" in err


@pytest.mark.slow
def test_a_time_budget_and_learning_rate_tuning(tmp_path, tiny_classifier_folder, capsys):
    model_dir, data = tiny_classifier_folder
    out = tmp_path / "report"
    code, _, err = run_cli(["compare", "--model", str(model_dir), "--data", str(data), "--methods", "lora,adalora",
                            "--budget-seconds", "0.5", "--tune-lr", "--batch-size", "8", "--eval-size", "12",
                            "--out", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    for row in results["rows"]:
        run = row["runs"][0]
        assert row["steps"] == len(row["losses"]) >= 1  # as many steps as fit, set by the calibration run
        table_lr = contender_for(row["name"]).train["lr"]
        tried = sorted(float(k) for k in run["lr_tried"])
        assert tried == pytest.approx([table_lr / 3, table_lr, table_lr * 3], rel=1e-2)
        best = max(run["lr_tried"].items(), key=lambda kv: kv[1])
        assert row["settings"]["train"]["lr"] == pytest.approx(float(best[0]), rel=1e-2)
    adalora = next(r for r in results["rows"] if r["name"] == "adalora")
    assert adalora["settings"]["adapter"]["total_steps"] == adalora["steps"]  # its schedule follows the budget
    assert "learning rates tuned per contender" in (out / "report.md").read_text()


@pytest.mark.slow
def test_causal_lm_bake_off_on_a_tiny_chat_model(tmp_path, tiny_chat_folder, capsys):
    model_dir, data = tiny_chat_folder
    out = tmp_path / "report"
    code, stdout, err = run_cli(["compare", "--task", "causal-lm", "--model", str(model_dir), "--data", str(data),
                                 "--methods", "lora,qlora,dora:r=4", "--steps", "3", "--eval-size", "4",
                                 "--memory-cap", "1GB", "--out", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["task"] == "causal-lm"
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["lora", "qlora", "dora:r=4"]
    held_out = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows.values():
        assert r["accuracy"] is None and r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert len(r["answers"]) == 3
        for a in r["answers"]:
            assert any(a["prompt"] == row["messages"][0]["content"] and a["reference"] == row["messages"][1]["content"]
                       for row in held_out)
    assert rows["qlora"]["model_weight_bytes"] < rows["lora"]["model_weight_bytes"]
    best = results["recommendations"][0]
    assert best["name"] == min(rows.values(), key=lambda r: r["eval_loss"])["name"]
    html = (out / "report.html").read_text()
    assert "Answers to held-out prompts" in html and html.count("data:image/png;base64,") == 2
    assert (out / "loss_vs_params.png").exists()


@pytest.mark.slow
def test_the_bake_off_report_opens_in_headless_chromium(tmp_path, tiny_chat_folder, capsys):
    from test_report import _chromium, open_in_chromium  # the existing report test's browser check

    assert _chromium() is not None, "chromium is not installed: ./run.sh test installs Debian's package"
    model_dir, data = tiny_chat_folder
    out = tmp_path / "report"
    code, _, err = run_cli(["compare", "--task", "causal-lm", "--model", str(model_dir), "--data", str(data),
                            "--methods", "lora,dora", "--sweep", "r=2,4", "--steps", "2", "--eval-size", "4",
                            "--out", str(out)], capsys)
    assert code == 0, err
    dom = open_in_chromium(out / "report.html", images=3)  # loss curves, loss vs params, the sweep
    assert "Which method should I use?" in dom and "Answers to held-out prompts" in dom and "dora:r=4" in dom
