"""torch.compile benchmark (issue 16): eager vs compiled training steps, lorakit vs PEFT, and compile times.

Sections, each its own side-by-side group on the core setup (contenders alternate step by step, as everywhere):

* ``lora``  the frozen floor, lorakit LoRA and PEFT LoRA, each eager and compiled
* ``dora``  lorakit DoRA and PEFT DoRA (``use_dora``), eager and compiled
* ``vera``  lorakit VeRA and PEFT VeRA (r=256), eager and compiled
* ``qlora`` lorakit QLoRA (NF4 + double quant, fp32 compute), eager and compiled

"Compiled" is ``torch.compile(model, fullgraph=True)`` with the default inductor backend for lorakit (any graph
break would be an error) and ``torch.compile(model)`` for PEFT (which may break; the table counts its graphs). Only
the model's forward and backward are compiled: the optimizer step and the training hooks stay eager, identical for
every contender. Compile time = the first compiled step (trace, inductor code generation for forward and backward,
one step) minus the median eager step of the same model. Before timing, each compiled model's first loss is checked
against its eager twin (same weights).

A FLOP/byte table gives the analytic floor of the eager targets: the multiply-adds an adapter adds to the frozen
floor's forward + input-gradient GEMMs, and the bytes AdamW touches per step.

Run: ``.venv/bin/python benchmarks/bench_compile.py [--only lora dora vera qlora] [--quick]``. Writes
``benchmarks/results/compile.md`` and ``compile.json``.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import ALPHA, R, build_lorakit, build_peft  # noqa: E402
from bench_methods import (  # noqa: E402
    VERA_R,
    build_lk_dora,
    build_lk_qlora,
    build_lk_vera,
    build_peft_dora,
    build_peft_vera,
)
from common import (  # noqa: E402
    LINEAR_TARGETS,
    Contender,
    Size,
    Table,
    alternate,
    base_parser,
    build_base,
    build_floor,
    iqr,
    make_batch,
    median,
    metadata,
    paired_ratio,
    resolve,
    set_threads,
    train_action,
    write_results,
)

SECTIONS = ("lora", "dora", "vera", "qlora")
#: (builder, compile lorakit-style with fullgraph=True?) per contender name stem, per section
GROUPS: dict[str, list[tuple[Callable, bool]]] = {
    "lora": [(build_floor, True), (build_lorakit, True), (build_peft, False)],
    "dora": [(build_lk_dora, True), (build_peft_dora, False)],
    "vera": [(build_lk_vera, True), (build_peft_vera, False)],
    "qlora": [(build_lk_qlora, True)],
}


def _allow_many_graphs() -> None:
    # every contender is another model object: give dynamo room for all of them (the default limit of 8 cached
    # graphs per code object would silently fall back to eager)
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))


class _EmbeddingsOutside(torch.nn.Module):
    """The compiled floor: the embedding (whose output the floor marks as requiring grad, an effect a compiled
    graph cannot return) runs eagerly, the rest of the model compiled from ``inputs_embeds``."""

    def __init__(self, model: torch.nn.Module, compiled: Callable):
        super().__init__()
        self.inner = model
        self.compiled = compiled

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        embeds = self.inner.get_input_embeddings()(input_ids)  # the floor's hook: requires grad
        return self.compiled(inputs_embeds=embeds, labels=labels)


def compiled_twin(build: Callable, base: torch.nn.Module, size: Size, fullgraph: bool) -> tuple[Contender, Any]:
    """The contender ``build`` makes, with its model compiled (inductor), and the graph counter."""
    from torch._dynamo.testing import CompileCounterWithBackend

    contender = build(base, size)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(contender.model, fullgraph=fullgraph, backend=counter)
    contender.model = _EmbeddingsOutside(contender.model, compiled) if build is build_floor else compiled
    contender.name += " compiled"
    return contender, counter


def section(name: str, base: torch.nn.Module, size: Size, targets: Table) -> tuple[list[Table], dict[str, Any]]:
    batch = make_batch(size)
    step = train_action(batch)
    eager, compiled, counters, fullgraph = [], [], {}, {}
    for build, full in GROUPS[name]:
        eager.append(build(copy.deepcopy(base), size))
        c, counter = compiled_twin(build, copy.deepcopy(base), size, full)
        compiled.append(c)
        counters[c.name], fullgraph[c.name] = counter, full
    # same weights, same function: compare the first losses without a training step
    first: dict[str, float] = {}
    with torch.no_grad():
        for c in eager:
            first[c.name] = float(c.model(**batch).loss)
    # compile: first compiled step (trace + codegen for forward and backward), then each eager step once for scale
    compile_s, first_loss = {}, {}
    for e, c in zip(eager, compiled):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        first_loss[c.name] = step(c)
        compile_s[c.name] = time.perf_counter() - t0
        first_loss[e.name] = step(e)
    contenders = [x for pair in zip(eager, compiled) for x in pair]
    times = alternate(contenders, step, size.warmup, size.rounds)
    eager_s = {c.name: median(times[c.name]) for c in eager}
    reference = eager[-1].name if name != "lora" else "PEFT LoRA"
    table = Table(f"{name}: training step eager vs torch.compile (inductor), {size.batch}x{size.seq} tokens, "
                  f"{size.rounds} alternating rounds",
                  ["contender", "median step ms", "IQR ms", "x eager twin", f"x {reference}", "graphs",
                   "compile s", "first loss", "eager first loss"])
    for e, c in zip(eager, compiled):
        for x in (e, c):
            is_c = x is c
            graphs = counters[c.name].frame_count if is_c else None
            comp = max(0.0, compile_s[c.name] - eager_s[e.name]) if is_c else None
            table.add(x.name, median(times[x.name]) * 1e3, iqr(times[x.name]) * 1e3,
                      paired_ratio(times, x.name, e.name), paired_ratio(times, x.name, reference),
                      graphs if not is_c or not fullgraph[c.name] else f"{graphs} (fullgraph)", comp,
                      first_loss[x.name], first[e.name])
    table.notes += [
        "compiled = torch.compile(model, fullgraph=True) for lorakit and the floor, torch.compile(model) for PEFT "
        "(graphs > 1 means graph breaks); optimizer step (AdamW, eager) and hooks are outside the compiled region",
        "compile s = first compiled training step minus the eager twin's median step; it includes dynamo tracing "
        "and inductor code generation for forward and backward",
        "first loss = the loss of that contender's first training step (same weights, same batch); eager first "
        "loss = the eager twin's no-grad loss before training",
    ]
    data = {"step_times_s": times, "compile_s": compile_s, "graphs": {k: v.frame_count for k, v in counters.items()},
            "first_loss": first_loss, "eager_first_loss": first}
    # targets
    if name == "lora":
        r1 = paired_ratio(times, "lorakit LoRA compiled", "floor compiled")
        r2 = paired_ratio(times, "lorakit LoRA compiled", "PEFT LoRA compiled")
        r3 = paired_ratio(times, "lorakit LoRA", "floor")
        targets.add("compiled LoRA step / compiled floor", "<= 1.05", r1, "yes" if r1 <= 1.05 else "no")
        targets.add("compiled LoRA step / PEFT LoRA compiled", "<= 0.95", r2, "yes" if r2 <= 0.95 else "no")
        targets.add("eager LoRA step / eager floor", "<= 1.08", r3, "yes" if r3 <= 1.08 else "no")
    elif name == "dora":
        r = paired_ratio(times, "lorakit DoRA compiled", "PEFT DoRA compiled")
        targets.add("compiled DoRA step / PEFT DoRA compiled", "<= 0.80", r, "yes" if r <= 0.80 else "no")
    elif name == "vera":
        r = paired_ratio(times, "lorakit VeRA", "PEFT VeRA")
        targets.add(f"eager VeRA (r={VERA_R}) step / PEFT VeRA", "<= 0.85", r, "yes" if r <= 0.85 else "no")
        r = paired_ratio(times, "lorakit VeRA compiled", "PEFT VeRA compiled")
        targets.add(f"compiled VeRA (r={VERA_R}) step / PEFT VeRA compiled", "(info)", r, "—")
    elif name == "qlora":
        r = paired_ratio(times, "lorakit QLoRA compiled", "lorakit QLoRA")
        targets.add("compiled QLoRA step / eager QLoRA", "(info)", r, "—")
    return [table], data


# ---------------------------------------------------------------------------------------------------------------
# the analytic floor of the eager targets: multiply-adds and optimizer bytes
# ---------------------------------------------------------------------------------------------------------------
def linear_shapes(size: Size) -> list[tuple[int, int]]:
    """(in, out) of every adapted linear layer of the setup."""
    h, m = size.hidden, size.intermediate
    per_layer = [(h, h)] * 4 + [(h, m), (h, m), (m, h)]
    return per_layer * size.layers


def flop_table(size: Size, measured: dict[str, float]) -> tuple[Table, dict[str, Any]]:
    """Multiply-adds per token of the frozen floor and of what each adapter adds, and AdamW's bytes per step."""
    tokens = size.batch * size.seq
    shapes = linear_shapes(size)
    frozen_linear = sum(i * o for i, o in shapes) + size.hidden * size.vocab  # + the LM head
    attention = size.layers * 2 * size.seq * size.hidden  # scores and weighted sum, per token (causal: ~half used)
    floor = 2 * (frozen_linear + attention)  # forward + input gradient (backward of a frozen GEMM = one GEMM)
    lora_extra = sum(3 * R * (i + o) for i, o in shapes)  # fwd x·Aᵀ, z·Bᵀ; bwd g·B, gz·A, gzᵀx, zᵀg
    lora_params = sum(R * (i + o) for i, o in shapes)
    # VeRA: fwd z = x·Aᵀ (r·in) once per distinct input (q/k/v share the attention input, gate/up the MLP input),
    # u = z·(B·d)ᵀ (r·out) per layer; bwd g·(diag(b)B) (out·r) per layer, then one gz·A (r·in) per distinct input
    # (autograd sums the siblings' r-wide gradients first); the d and b gradients are elementwise
    distinct_in = size.layers * (3 * size.hidden + size.intermediate)
    vera_extra = 2 * sum(VERA_R * o for _, o in shapes) + 2 * VERA_R * distinct_in
    peft_vera_extra = 2 * sum(VERA_R * o for _, o in shapes) + 2 * sum(VERA_R * i for i, _ in shapes)
    vera_params = sum(VERA_R + o for _, o in shapes)
    # AdamW (per-tensor loop): reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq
    adam_bytes = lambda n: 7 * 4 * n  # noqa: E731
    table = Table("Analytic floor of the eager targets (multiply-adds per token; AdamW bytes per step)",
                  ["what", "frozen floor", f"LoRA r={R}", f"lorakit VeRA r={VERA_R}", f"PEFT VeRA r={VERA_R}"])
    table.add("GEMM multiply-adds per token (fwd + input grad of frozen weights)", floor, floor, floor, floor)
    table.add("multiply-adds the adapter adds per token (fwd + bwd)", 0, lora_extra, vera_extra, peft_vera_extra)
    table.add("FLOP ratio to the floor", 1.0, (floor + lora_extra) / floor, (floor + vera_extra) / floor,
              (floor + peft_vera_extra) / floor)
    table.add("FLOP ratio to PEFT VeRA", None, None, (floor + vera_extra) / (floor + peft_vera_extra), 1.0)
    table.add("trainable parameters", 0, lora_params, vera_params, vera_params)
    table.add("AdamW MiB moved per step", 0.0, adam_bytes(lora_params) / 2**20, adam_bytes(vera_params) / 2**20,
              adam_bytes(vera_params) / 2**20)
    table.add("AdamW tensors", 0, 2 * len(shapes), 2 * len(shapes), 2 * len(shapes))
    # LoRA's r-wide GEMMs are memory-bound: per token and layer they stream x (fwd), y (in-place rank-r add), g
    # (g·B), gx (in-place rank-r add), x (gzᵀx) and g (zᵀg): 4·(in + out) fp32 values
    lora_bytes = tokens * sum(16 * (i + o) for i, o in shapes)
    bandwidth = copy_bandwidth()
    table.add("activation MiB the low-rank GEMMs stream per step", 0.0, lora_bytes / 2**20, None, None)
    table.add(f"... at the measured copy bandwidth ({bandwidth / 1e9:.1f} GB/s), ms", 0.0,
              1e3 * lora_bytes / bandwidth, None, None)
    table.notes += [
        f"{tokens} tokens per step; {len(shapes)} adapted linear layers; attention counted as 2·seq·hidden "
        "multiply-adds per token and layer (scores + weighted sum, both directions); norms, softmax, RoPE, SiLU "
        "and the loss are elementwise (bytes, not FLOPs) and identical for every contender",
        "LoRA adds 3·r·(in+out) multiply-adds per token and layer: forward x·Aᵀ and z·Bᵀ, backward g·B, the "
        "rank-r update of the input gradient, and the two weight gradients; the same count for PEFT's LoRA. Those "
        "r-wide GEMMs do ~2·r multiply-adds per value they stream, so they run at memory speed, not GEMM speed: the "
        "streamed MiB at the copy bandwidth bound their time from below where the activations leave the cache "
        "(a 512x512 fp32 activation, 1 MiB, may stay in cache between the base GEMM and the branch)",
        "VeRA's x·Aᵀ and its input-gradient GEMM run once per distinct input (q/k/v share one, gate/up another); "
        "PEFT runs both per layer. Both keep the same frozen-GEMM floor, so the FLOP ratio to PEFT bounds how far "
        "below PEFT a VeRA step can go when GEMMs dominate",
    ] + [f"measured {k}: {v:.3f}" for k, v in measured.items()]
    return table, {"floor_macs_per_token": floor, "lora_extra": lora_extra, "vera_extra": vera_extra,
                   "peft_vera_extra": peft_vera_extra, "lora_params": lora_params, "vera_params": vera_params}


def copy_bandwidth(mib: int = 64, repeats: int = 7) -> float:
    """Bytes per second of ``c = a + b`` on ``mib``-MiB fp32 tensors (reads two, writes one): the machine's streaming
    bandwidth at the moment, under whatever else runs on it."""
    n = mib * 2**20 // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return 3 * 4 * n / median(times)


def run(args) -> dict[str, Any]:
    set_threads(args.threads)
    _allow_many_graphs()
    size_name, size = resolve(args)
    meta = metadata(threads=args.threads)
    base = build_base(size)
    tables, data = [], {"size": size.__dict__}
    targets = Table("Targets (issue 16)", ["target", "goal", "measured", "met"])
    for name in args.only or SECTIONS:
        print(f"[bench_compile] section {name} ...", file=sys.stderr, flush=True)
        try:
            new_tables, section_data = section(name, base, size, targets)
        except Exception as exc:  # one failing section must not take the others down; the table says so
            traceback.print_exc()
            targets.notes.append(f"section {name} failed: {type(exc).__name__}: {exc}")
            continue
        tables += new_tables
        data[name] = section_data
        torch._dynamo.reset()  # free the section's graphs before the next one
        write(args, size, meta, tables, targets, data)  # after every section: a long run keeps what it measured
    flops = write(args, size, meta, tables, targets, data, final=True)
    return {"tables": tables + [flops, targets], "data": data, "meta": meta}


def write(args, size: Size, meta: dict[str, Any], tables: list[Table], targets: Table, data: dict[str, Any],
          final: bool = False) -> Table:
    """Write the results so far (the FLOP table reflects the targets measured so far); returns the FLOP table."""
    measured = {row[0]: row[2] for row in targets.rows}
    flops, data["flops"] = flop_table(size, measured)
    load = os.getloadavg()[0]
    notes = targets.notes
    targets.notes = notes + [f"load average (1 min) when written: {load:.2f} on {meta['cpu_count']} CPUs (shared "
                             "machine: other processes ran during the measurement; contenders alternate step by step "
                             "so each ratio sees the same load)" + ("" if final else "; sections still running")]
    write_results("compile" + ("_quick" if args.quick else ""), tables + [flops, targets], meta, data, args.out)
    targets.notes = notes
    return flops


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
