"""LoRA benchmark (issue 2): lorakit LoRA vs PEFT LoRA vs the frozen floor, trained side by side, plus inference.

Run: ``.venv/bin/python benchmarks/bench_lora.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/lora.md`` and ``lora.json``.

Targets: lorakit step <= 0.95x PEFT's and <= 1.08x the floor's; merged inference within 2% of the base model.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    LINEAR_TARGETS,
    Contender,
    Size,
    Table,
    adamw,
    alternate,
    base_parser,
    build_base,
    build_floor,
    bytes_saved_for_backward,
    eval_action,
    fill_low_rank,
    iqr,
    make_batch,
    median,
    metadata,
    mib,
    paired_ratio,
    peak_rss,
    resolve,
    set_threads,
    train_action,
    trainable_count,
    write_results,
)

R, ALPHA = 16, 32


# ---------------------------------------------------------------------------------------------------------------
# builders: (base model to take over, size) -> Contender; also used by the peak-RSS child processes
# ---------------------------------------------------------------------------------------------------------------
def attach_lorakit(base: nn.Module, method: str = "lora", r: int = R, alpha: float = ALPHA, fill: bool = True,
                   **fields: Any) -> nn.Module:
    import lorakit
    from lorakit.model import adapted_layers

    fields.setdefault("seed", 0)
    lorakit.attach(base, lorakit.AdapterConfig(method=method, r=r, alpha=alpha, targets=list(LINEAR_TARGETS),
                                               dropout=0.0, **fields))
    if fill:
        for path, layer in adapted_layers(base):
            ad = layer.adapters["default"]
            fill_low_rank(path, ad.A, ad.B)
    return base


def attach_peft_lora(base: nn.Module, fill: bool = True, **fields: Any) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(LINEAR_TARGETS),
                                            lora_dropout=0.0, **fields))
    if fill:
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                path = name.removeprefix("base_model.model.")
                fill_low_rank(path, module.lora_A["default"].weight, module.lora_B["default"].weight)
    return model


def build_lorakit(base: nn.Module, size: Size) -> Contender:
    model = attach_lorakit(base)
    return Contender("lorakit LoRA", model, adamw(model))


def build_peft(base: nn.Module, size: Size) -> Contender:
    model = attach_peft_lora(base)
    return Contender("PEFT LoRA", model, adamw(model))


# ---------------------------------------------------------------------------------------------------------------
def run(args) -> dict[str, Any]:
    set_threads(args.threads)
    size_name, size = resolve(args)
    meta = metadata(threads=args.threads)
    base = build_base(size)
    batch = make_batch(size)

    # -- training, side by side ---------------------------------------------------------------------------------
    builders = [("floor", build_floor), ("lorakit LoRA", build_lorakit), ("PEFT LoRA", build_peft)]
    specs = {"floor": "common:build_floor", "lorakit LoRA": "bench_lora:build_lorakit",
             "PEFT LoRA": "bench_lora:build_peft"}
    contenders = [b(copy.deepcopy(base), size) for _, b in builders]
    by = {c.name: c for c in contenders}
    # same weights, same computation: the first losses must agree before anything is timed
    with torch.no_grad():
        first = {c.name: float(c.model(**batch).loss) for c in contenders}
    same = abs(first["lorakit LoRA"] - first["PEFT LoRA"]) < 1e-4
    saved = {c.name: bytes_saved_for_backward(c.model, batch) for c in contenders}
    cpu: dict[str, list[float]] = {}
    times = alternate(contenders, train_action(batch), size.warmup, size.rounds, cpu)
    peaks = {}
    if not (args.quick or args.no_peak):
        peaks = {name: peak_rss(spec, size_name, args.threads) for name, spec in specs.items()}

    train = Table(
        f"Training step, {size.batch}x{size.seq} tokens, LoRA r={R} alpha={ALPHA} on {len(LINEAR_TARGETS)} linear "
        f"layer types, {size.rounds} alternating rounds",
        ["contender", "trainable params", "median step ms", "IQR ms", "x floor", "x PEFT", "CPU-time x floor",
         "CPU-time x PEFT", "saved for backward MiB (activations)", "saved MiB (incl. weights)",
         "peak RSS growth MiB"])
    for c in contenders:
        t = times[c.name]
        pk = peaks.get(c.name)
        train.add(c.name, trainable_count(c.model), median(t) * 1e3, iqr(t) * 1e3,
                  paired_ratio(times, c.name, "floor"), paired_ratio(times, c.name, "PEFT LoRA"),
                  paired_ratio(cpu, c.name, "floor"), paired_ratio(cpu, c.name, "PEFT LoRA"),
                  mib(saved[c.name]["activations"]), mib(saved[c.name]["total"]),
                  mib(pk["peak_growth"]) if pk else None)
    train.notes += [
        "ratios are medians of the per-round ratios (each round times every contender once, in rotating order); "
        "'x' columns use wall time, 'CPU-time' columns the process CPU time of the same steps (all threads)",
        "floor = the same model with every weight frozen and no adapter; the embedding output requires grad, so "
        "backward computes input gradients through every layer and no weight gradient; no optimizer step",
        "saved for backward = bytes of the distinct storages packed by torch.autograd.graph.saved_tensors_hooks "
        "during one training forward; 'activations' leaves out the model's own parameters",
        "peak RSS growth = VmHWM after 3 training steps minus VmRSS after building, each contender in a fresh "
        "process with MALLOC_MMAP_THRESHOLD_=131072 (includes optimizer state and gradients)",
        f"first loss lorakit {first['lorakit LoRA']:.6f} vs PEFT {first['PEFT LoRA']:.6f} "
        f"({'identical weights confirmed' if same else 'MISMATCH'})",
    ]

    # -- inference -------------------------------------------------------------------------------------------------
    import lorakit

    plain = copy.deepcopy(base).eval()
    merged = attach_lorakit(copy.deepcopy(base)).eval()
    lorakit.merge(merged)
    unmerged = attach_lorakit(copy.deepcopy(base)).eval()
    peft_unmerged = attach_peft_lora(copy.deepcopy(base)).eval()
    inf = [Contender("base model", plain), Contender("lorakit merged", merged),
           Contender("lorakit unmerged", unmerged), Contender("PEFT unmerged", peft_unmerged)]
    with torch.inference_mode():
        same_merge = torch.allclose(merged(input_ids=batch["input_ids"]).logits,
                                    unmerged(input_ids=batch["input_ids"]).logits, atol=1e-4)
    # forwards are cheap and the merged/base gap is meant to be ~0: twice the rounds for a tighter median
    ftimes = alternate(inf, eval_action(batch), size.warmup, 2 * size.rounds)
    infer = Table(f"Inference forward (eval, inference_mode), {size.batch}x{size.seq} tokens",
                  ["model", "median forward ms", "IQR ms", "x base model"])
    for c in inf:
        infer.add(c.name, median(ftimes[c.name]) * 1e3, iqr(ftimes[c.name]) * 1e3,
                  paired_ratio(ftimes, c.name, "base model"))
    infer.notes.append(f"merged logits equal unmerged logits (atol 1e-4): {same_merge}")

    # -- targets ------------------------------------------------------------------------------------------------
    vs_peft = paired_ratio(times, "lorakit LoRA", "PEFT LoRA")
    vs_floor = paired_ratio(times, "lorakit LoRA", "floor")
    merged_ratio = paired_ratio(ftimes, "lorakit merged", "base model")
    targets = Table("Targets (issue 2)", ["target", "goal", "measured", "met"])
    targets.add("lorakit step / PEFT step", "<= 0.95", vs_peft, "yes" if vs_peft <= 0.95 else "no")
    targets.add("lorakit step / floor step", "<= 1.08", vs_floor, "yes" if vs_floor <= 1.08 else "no")
    targets.add("merged forward / base forward", "<= 1.02", merged_ratio, "yes" if merged_ratio <= 1.02 else "no")

    data = {"size": size.__dict__, "step_times_s": times, "step_cpu_s": cpu, "forward_times_s": ftimes, "bytes_saved": saved,
            "peak_rss": peaks, "first_loss": first, "merged_equals_unmerged": same_merge}
    write_results("lora" + ("_quick" if args.quick else ""), [train, infer, targets], meta, data, args.out)
    return {"tables": [train, infer, targets], "data": data, "meta": meta}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
