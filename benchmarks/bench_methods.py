"""Family benchmarks (issues 3, 4, 5) on the core setup: each method side by side with its reference.

Sections (each skipped with a printed reason when its method is not available on this installation):

* ``dora``    lorakit DoRA vs PEFT ``use_dora`` (+ lorakit LoRA): step, bytes saved, peak RSS; unmerged eval forward
* ``vera``    lorakit VeRA vs PEFT VeRA, r=256
* ``lora_fa`` LoRA-FA vs the frozen floor (bytes saved for backward) and vs lorakit LoRA (step)
* ``adalora`` lorakit AdaLoRA vs PEFT AdaLoRA (same schedule, both with their allocation hook and orth. loss)
* ``overhead`` SoRA, Delta-LoRA (updating from step 0), LoRA-drop (half the layers selected) vs lorakit LoRA
* ``qlora``   lorakit quantize + LoRA vs PEFT LoRA on bitsandbytes ``Linear4bit`` (NF4, double quant) on CPU:
  step time and resident model bytes; quantisation and LoftQ init times

Run: ``.venv/bin/python benchmarks/bench_methods.py [--only dora vera ...] [--quick]``. Writes
``benchmarks/results/methods.md`` and ``methods.json``.
"""
from __future__ import annotations

import copy
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import ALPHA, R, attach_lorakit, attach_peft_lora, build_lorakit  # noqa: E402
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
    iqr,
    make_batch,
    median,
    metadata,
    mib,
    paired_ratio,
    path_generator,
    peak_rss,
    resolve,
    set_threads,
    train_action,
    trainable_count,
    write_results,
)

VERA_R = 256
ADALORA = {"target_r": 8, "total_steps": 200, "t_init": 0, "t_final": 0, "delta_t": 1, "orth_reg": 0.5}
SECTIONS = ("dora", "vera", "lora_fa", "adalora", "overhead", "qlora")


class Skip(Exception):
    """A section cannot run here (method or dependency missing); the message says why."""


def need_method(name: str) -> None:
    from lorakit.methods import METHODS, get_method

    if name not in METHODS:
        raise Skip(f"method {name!r} is not registered")
    try:
        get_method(name)
    except Exception as exc:  # a half-written method file may fail in any way; report it, run the rest
        raise Skip(f"method {name!r} is not available yet ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------------------------
# identical weights in both libraries
# ---------------------------------------------------------------------------------------------------------------
def fill_vector(path: str, v: torch.Tensor, std: float = 0.02) -> None:
    g = path_generator(path, seed=11)
    with torch.no_grad():
        v.copy_(torch.randn(v.shape, generator=g).reshape(v.shape) * std)


def fill_factors(path: str, a: torch.Tensor, b: torch.Tensor) -> None:
    from common import fill_low_rank

    fill_low_rank(path, a, b)


def fill_lorakit(model: nn.Module, method: str) -> None:
    """Deterministic, path-keyed values for every trained tensor of every lorakit adapter (and shared pair)."""
    from lorakit.model import adapted_layers, registry

    for path, layer in adapted_layers(model):
        ad = layer.adapters["default"]
        if method == "vera":
            fill_vector(path, ad.lambda_b)
            continue
        a, b = getattr(ad, "A", None), getattr(ad, "B", None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2:
            fill_factors(path, a, b)
        if method == "adalora":
            fill_vector(path + ".E", ad.E)
    shared = registry(model).shared.get("default")
    if shared is not None:  # e.g. LoRA-drop's shared pairs: give them real (non-zero) values too
        for name, mod in shared.named_modules():
            a, b = getattr(mod, "A", None), getattr(mod, "B", None)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2:
                fill_factors("shared." + name, a, b)


def fill_peft(model: nn.Module, method: str) -> None:
    for name, module in model.named_modules():
        path = name.removeprefix("base_model.model.")
        if method in ("lora", "dora", "adalora") and hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"], module.lora_B["default"]
            a = a.weight if isinstance(a, nn.Module) else a
            b = b.weight if isinstance(b, nn.Module) else b
            fill_factors(path, a, b)
            if method == "adalora":
                fill_vector(path + ".E", module.lora_E["default"])
        if method == "vera" and hasattr(module, "vera_lambda_b") and "default" in module.vera_lambda_b:
            fill_vector(path, module.vera_lambda_b["default"])


# ---------------------------------------------------------------------------------------------------------------
# builders (base, size) -> Contender; module-level so the peak-RSS child processes can call them
# ---------------------------------------------------------------------------------------------------------------
def lk(base: nn.Module, method: str, r: int = R, **fields: Any) -> nn.Module:
    alpha = None if method == "vera" else ALPHA
    model = attach_lorakit(base, method=method, r=r, alpha=alpha, fill=False, **fields)
    fill_lorakit(model, method)
    return model


def with_hooks(name: str, model: nn.Module, optimizer=None, regularize: bool = False) -> Contender:
    import lorakit

    hooks = lorakit.training_hooks(model)
    return Contender(name, model, optimizer or adamw(model), after_step=hooks.after_step,
                     extra_loss=(lambda: lorakit.regularization_loss(model)) if regularize else None)


def build_lk_dora(base, size):
    return Contender("lorakit DoRA", m := lk(base, "dora"), adamw(m))


def build_peft_dora(base, size):
    m = attach_peft_lora(base, fill=False, use_dora=True)
    fill_peft(m, "dora")
    return Contender("PEFT DoRA", m, adamw(m))


def build_lk_vera(base, size):
    return Contender("lorakit VeRA", m := lk(base, "vera", r=VERA_R, seed=0), adamw(m))


def build_peft_vera(base, size):
    from peft import VeraConfig, get_peft_model

    m = get_peft_model(base, VeraConfig(r=VERA_R, target_modules=list(LINEAR_TARGETS), projection_prng_key=0,
                                        vera_dropout=0.0, d_initial=0.1))
    fill_peft(m, "vera")
    return Contender("PEFT VeRA", m, adamw(m))


def build_lk_lora_fa(base, size):
    return Contender("lorakit LoRA-FA", m := lk(base, "lora_fa"), adamw(m))


def build_lk_adalora(base, size):
    return with_hooks("lorakit AdaLoRA", lk(base, "adalora", **ADALORA), regularize=True)


def build_peft_adalora(base, size):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=R, target_r=ADALORA["target_r"], lora_alpha=ALPHA, lora_dropout=0.0,
                        target_modules=list(LINEAR_TARGETS), tinit=ADALORA["t_init"], tfinal=ADALORA["t_final"],
                        deltaT=ADALORA["delta_t"], total_step=ADALORA["total_steps"],
                        orth_reg_weight=ADALORA["orth_reg"], task_type="CAUSAL_LM")
    m = get_peft_model(base, cfg)
    fill_peft(m, "adalora")
    counter = [0]

    def allocate():  # PEFT's AdaLoRA does nothing unless this is called after every step (PEFT issues 1801, 1327)
        counter[0] += 1
        m.base_model.update_and_allocate(counter[0])

    # PEFT adds the orthogonal regulariser to outputs.loss itself, but only through a task model (task_type set);
    # a bare PeftModel's forward skips it
    return Contender("PEFT AdaLoRA", m, adamw(m), after_step=allocate)


def build_lk_sora(base, size):
    m = lk(base, "sora")
    gates = [p for n, p in m.named_parameters() if p.requires_grad and n.endswith("gate")]
    rest = [p for n, p in m.named_parameters() if p.requires_grad and not n.endswith("gate")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": gates, "weight_decay": 0.0}], lr=1e-4)
    return with_hooks("lorakit SoRA", m, opt)


def build_lk_delta(base, size):
    return with_hooks("lorakit Delta-LoRA", lk(base, "delta_lora", delta_start=0))


def lora_drop_selection(size: Size) -> list[str]:
    """Stage 2 of LoRA-drop as the benchmark runs it: the first half of the decoder layers keep their own pairs,
    the rest share one pair per module type."""
    keep = max(1, size.layers // 2)
    return [f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}"
            for i in range(keep) for t in LINEAR_TARGETS]


def build_lk_lora_drop(base, size):
    m = lk(base, "lora_drop", drop_selected=lora_drop_selection(size))
    return Contender("lorakit LoRA-drop", m, adamw(m))


def _bnb_quantize(base: nn.Module) -> nn.Module:
    """Replace every decoder linear by a bitsandbytes ``Linear4bit`` (NF4, double quant, fp32 compute) on CPU."""
    import bitsandbytes as bnb

    for name, mod in list(base.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear and child_name in LINEAR_TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                                      device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                q.weight = q.weight._quantize("cpu") if hasattr(q.weight, "_quantize") else q.weight.to("cpu")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(mod, child_name, q)
    return base


def _lk_quantize(base: nn.Module) -> nn.Module:
    import lorakit

    return lorakit.quantize(base, bits=4, double_quant=True, compute_dtype=torch.float32, skip=("lm_head",))


def build_lk_qlora(base, size):
    m = _lk_quantize(base)
    m = lk(m, "lora")
    return Contender("lorakit QLoRA", m, adamw(m))


def build_peft_qlora(base, size):
    m = attach_peft_lora(_bnb_quantize(base))
    return Contender("PEFT+bnb QLoRA", m, adamw(m))


def deep_resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a model holds: parameters, buffers, and tensors kept in plain attributes (such as
    bitsandbytes' ``quant_state`` absmax/code tensors, which are neither), deduplicated by storage."""
    seen: dict[int, int] = {}

    def visit(obj: Any, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
            if depth > 0 and getattr(obj, "__dict__", None):
                for v in vars(obj).values():
                    visit(v, depth - 1)
        elif isinstance(obj, nn.Module):
            return  # each module is visited by the named_modules loop
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth - 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth - 1)
        elif depth > 0 and hasattr(obj, "__dict__") and not callable(obj):
            for v in vars(obj).values():
                visit(v, depth - 1)

    for mod in model.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                visit(t, 3)
        for k, v in vars(mod).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                visit(v, 3)
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------------
# the side-by-side runner shared by every section
# ---------------------------------------------------------------------------------------------------------------
def side_by_side(title: str, entries: list[tuple[Callable, str | None]], base: nn.Module, size: Size, args,
                 size_name: str, reference: str, peak: bool = False, equal_pairs: list[tuple[str, str]] = ()):
    """Build the contenders from copies of ``base``, check equal-weight pairs agree, measure, and tabulate."""
    batch = make_batch(size)
    contenders = [build(copy.deepcopy(base), size) for build, _ in entries]
    first = {}
    with torch.no_grad():
        for c in contenders:
            loss = c.model(**batch).loss
            extra = c.extra_loss() if c.extra_loss is not None else None
            first[c.name] = float(loss + (extra if extra is not None else 0.0))
    saved = {c.name: bytes_saved_for_backward(c.model, batch) for c in contenders}
    times = alternate(contenders, train_action(batch), size.warmup, size.rounds)
    peaks = {}
    if peak and not (args.quick or args.no_peak):
        peaks = {c.name: peak_rss(spec, size_name, args.threads) for c, (_, spec) in zip(contenders, entries)
                 if spec}
    table = Table(title, ["contender", "trainable params", "median step ms", "IQR ms", f"x {reference}",
                          "saved for backward MiB (activations)", "peak RSS growth MiB"])
    for c in contenders:
        pk = peaks.get(c.name)
        table.add(c.name, trainable_count(c.model), median(times[c.name]) * 1e3, iqr(times[c.name]) * 1e3,
                  paired_ratio(times, c.name, reference), mib(saved[c.name]["activations"]),
                  mib(pk["peak_growth"]) if pk else None)
    for a, b in equal_pairs:
        ok = abs(first[a] - first[b]) < 1e-4 * max(1.0, abs(first[b]))
        table.notes.append(f"first loss {a} {first[a]:.6f} vs {b} {first[b]:.6f} "
                           f"({'identical weights confirmed' if ok else 'MISMATCH: not the same computation'})")
    data = {"step_times_s": times, "bytes_saved": saved, "peak_rss": peaks, "first_loss": first}
    return table, times, saved, peaks, contenders, data


def target_row(targets: Table, what: str, goal: str, value: float | None, ok: bool | None) -> None:
    targets.add(what, goal, value, "—" if ok is None else ("yes" if ok else "no"))


# ---------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------
def section_dora(base, size, args, size_name, targets):
    need_method("dora")
    table, times, saved, peaks, _, data = side_by_side(
        f"DoRA r={R}: training step", [(build_lorakit, "bench_lora:build_lorakit"),
                                       (build_lk_dora, "bench_methods:build_lk_dora"),
                                       (build_peft_dora, "bench_methods:build_peft_dora")],
        base, size, args, size_name, "PEFT DoRA", peak=True, equal_pairs=[("lorakit DoRA", "PEFT DoRA")])
    import lorakit

    batch = make_batch(size)
    merged = lk(copy.deepcopy(base), "dora").eval()
    lorakit.merge(merged)
    models = [Contender("base model", copy.deepcopy(base).eval()), Contender("lorakit DoRA merged", merged),
              Contender("lorakit DoRA unmerged", lk(copy.deepcopy(base), "dora").eval()),
              Contender("PEFT DoRA unmerged", build_peft_dora(copy.deepcopy(base), size).model.eval())]
    ftimes = alternate(models, eval_action(batch), size.warmup, size.rounds)
    infer = Table("DoRA: inference forward (eval)", ["model", "median forward ms", "IQR ms", "x base model"])
    for c in models:
        infer.add(c.name, median(ftimes[c.name]) * 1e3, iqr(ftimes[c.name]) * 1e3,
                  paired_ratio(ftimes, c.name, "base model"))
    r = paired_ratio(times, "lorakit DoRA", "PEFT DoRA")
    target_row(targets, "DoRA step / PEFT DoRA step", "<= 0.85", r, r <= 0.85)
    if peaks.get("lorakit DoRA") and peaks.get("PEFT DoRA"):
        pr = peaks["lorakit DoRA"]["peak_growth"] / max(1, peaks["PEFT DoRA"]["peak_growth"])
        target_row(targets, "DoRA peak RSS growth / PEFT DoRA's", "<= 1.0", pr, pr <= 1.0)
    sr = saved["lorakit DoRA"]["activations"] / max(1, saved["PEFT DoRA"]["activations"])
    target_row(targets, "DoRA bytes saved for backward / PEFT DoRA's", "(info)", sr, None)
    ur = paired_ratio(ftimes, "lorakit DoRA unmerged", "base model")
    target_row(targets, "DoRA unmerged eval forward / base", "<= 1.15", ur, ur <= 1.15)
    data["forward_times_s"] = ftimes
    return [table, infer], data


def section_vera(base, size, args, size_name, targets):
    need_method("vera")
    table, times, *_, data = side_by_side(
        f"VeRA r={VERA_R}: training step", [(build_lk_vera, None), (build_peft_vera, None)],
        base, size, args, size_name, "PEFT VeRA", equal_pairs=[("lorakit VeRA", "PEFT VeRA")])
    r = paired_ratio(times, "lorakit VeRA", "PEFT VeRA")
    target_row(targets, f"VeRA (r={VERA_R}) step / PEFT VeRA step", "<= 0.85", r, r <= 0.85)
    return [table], data


def section_lora_fa(base, size, args, size_name, targets):
    need_method("lora_fa")
    table, times, saved, *_, data = side_by_side(
        f"LoRA-FA r={R}: memory and step", [(build_floor, "common:build_floor"),
                                            (build_lorakit, "bench_lora:build_lorakit"),
                                            (build_lk_lora_fa, "bench_methods:build_lk_lora_fa")],
        base, size, args, size_name, "lorakit LoRA", peak=True)
    fa, fl, lo = (saved[k]["activations"] for k in ("lorakit LoRA-FA", "floor", "lorakit LoRA"))
    table.notes.append(f"bytes saved for backward (activations): LoRA-FA {fa / fl:.3f}x the floor, "
                       f"LoRA {lo / fl:.3f}x the floor")
    target_row(targets, "LoRA-FA bytes saved / floor's", "<= 1.03", fa / fl, fa / fl <= 1.03)
    r = paired_ratio(times, "lorakit LoRA-FA", "lorakit LoRA")
    target_row(targets, "LoRA-FA step / lorakit LoRA step", "<= 1.0", r, r <= 1.0)
    return [table], data


def section_adalora(base, size, args, size_name, targets):
    need_method("adalora")
    table, times, *_, data = side_by_side(
        f"AdaLoRA r={R}->{ADALORA['target_r']} (allocation every step, orth. reg. {ADALORA['orth_reg']}): "
        "training step", [(build_lk_adalora, None), (build_peft_adalora, None)],
        base, size, args, size_name, "PEFT AdaLoRA", equal_pairs=[("lorakit AdaLoRA", "PEFT AdaLoRA")])
    r = paired_ratio(times, "lorakit AdaLoRA", "PEFT AdaLoRA")
    target_row(targets, "AdaLoRA step / PEFT AdaLoRA step", "<= 0.95", r, r <= 0.95)
    return [table], data


def section_overhead(base, size, args, size_name, targets):
    entries, skipped = [(build_lorakit, None)], []
    for method, build in (("sora", build_lk_sora), ("delta_lora", build_lk_delta), ("lora_drop", build_lk_lora_drop)):
        try:
            need_method(method)
            entries.append((build, None))
        except Skip as exc:
            skipped.append(str(exc))
    if len(entries) == 1:
        raise Skip("; ".join(skipped))
    table, times, *_, data = side_by_side(
        f"Training-time methods r={R}: step overhead over lorakit LoRA", entries, base, size, args, size_name,
        "lorakit LoRA")
    table.notes += [f"skipped: {s}" for s in skipped]
    table.notes += ["SoRA: gates in their own AdamW group without weight decay, proximal step after every step",
                    "Delta-LoRA: delta_start=0, so the base update runs after every step",
                    "LoRA-drop: stage 2 with the first half of the decoder layers selected (own pairs), the other "
                    "half sharing one pair per module type"]
    for c in table.rows[1:]:
        target_row(targets, f"{c[0]} step / lorakit LoRA step", "(overhead)", c[4], None)
    return [table], data


def section_qlora(base, size, args, size_name, targets):
    try:
        import lorakit

        lorakit.quantize  # noqa: B018 - lazy name: raises if lorakit.quant is not there yet
    except Exception as exc:
        raise Skip(f"lorakit.quantize is not available yet ({type(exc).__name__}: {exc})") from None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise Skip(f"bitsandbytes is not importable ({exc})") from None
    t0 = time.perf_counter()
    q_lk = _lk_quantize(copy.deepcopy(base))
    t_lk = time.perf_counter() - t0
    t0 = time.perf_counter()
    q_bnb = _bnb_quantize(copy.deepcopy(base))
    t_bnb = time.perf_counter() - t0
    res_lk, res_bnb, res_fp = deep_resident_bytes(q_lk), deep_resident_bytes(q_bnb), deep_resident_bytes(base)
    del q_lk, q_bnb
    table, times, *_, data = side_by_side(
        f"QLoRA r={R} (NF4 + double quant, fp32 compute, CPU): training step",
        [(build_lk_qlora, "bench_methods:build_lk_qlora"), (build_peft_qlora, "bench_methods:build_peft_qlora")],
        base, size, args, size_name, "PEFT+bnb QLoRA", peak=True)
    loftq_s = None
    try:
        t0 = time.perf_counter()
        lorakit.attach(copy.deepcopy(base), lorakit.AdapterConfig(r=R, alpha=ALPHA, targets=list(LINEAR_TARGETS),
                                                                  init="loftq", loftq_iter=1, seed=0))
        loftq_s = time.perf_counter() - t0
    except Exception as exc:
        table.notes.append(f"LoftQ init not measured: {type(exc).__name__}: {exc}")
    extra = Table("QLoRA: model bytes and preparation time",
                  ["what", "lorakit", "PEFT + bitsandbytes", "ratio"])
    extra.add("resident model MiB (all tensors, fp32 embeddings/head included)", mib(res_lk), mib(res_bnb),
              res_lk / res_bnb)
    extra.add("quantise the whole model, s", t_lk, t_bnb, t_lk / t_bnb)
    extra.add("LoftQ init (1 iteration, quantise + SVD) of the whole model, s", loftq_s, None, None)
    extra.notes.append(f"fp32 model: {mib(res_fp):.1f} MiB")
    r = paired_ratio(times, "lorakit QLoRA", "PEFT+bnb QLoRA")
    target_row(targets, "QLoRA step / PEFT+bnb step", "<= 1.0", r, r <= 1.0)
    target_row(targets, "QLoRA resident bytes / PEFT+bnb's", "<= 1.0", res_lk / res_bnb, res_lk <= res_bnb)
    data.update({"resident_bytes": {"lorakit": res_lk, "bnb": res_bnb, "fp32": res_fp},
                 "quantize_s": {"lorakit": t_lk, "bnb": t_bnb}, "loftq_init_s": loftq_s})
    return [table, extra], data


SECTION_FUNCS = {"dora": section_dora, "vera": section_vera, "lora_fa": section_lora_fa,
                 "adalora": section_adalora, "overhead": section_overhead, "qlora": section_qlora}


def run(args) -> dict[str, Any]:
    set_threads(args.threads)
    size_name, size = resolve(args)
    meta = metadata(threads=args.threads)
    base = build_base(size)
    tables, data, skipped = [], {"size": size.__dict__}, {}
    targets = Table("Targets (issues 3, 4, 5)", ["target", "goal", "measured", "met"])
    for name in args.only or SECTIONS:
        print(f"[bench_methods] section {name} ...", file=sys.stderr, flush=True)
        try:
            new_tables, section_data = SECTION_FUNCS[name](base, size, args, size_name, targets)
        except Skip as exc:
            print(f"[bench_methods] skipped {name}: {exc}", file=sys.stderr, flush=True)
            skipped[name] = str(exc)
            continue
        except Exception as exc:  # a method under construction must not take the other sections down
            traceback.print_exc()
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            print(f"[bench_methods] {name} failed: {exc}", file=sys.stderr, flush=True)
            continue
        tables += new_tables
        data[name] = section_data
    if skipped:
        targets.notes += [f"section {k} not run: {v}" for k, v in skipped.items()]
    data["skipped"] = skipped
    write_results("methods" + ("_quick" if args.quick else ""), tables + [targets], meta, data, args.out)
    return {"tables": tables + [targets], "data": data, "meta": meta}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
