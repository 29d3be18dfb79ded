"""``lorakit.to_lora`` on a real model: how long it takes, and what a rank budget costs a DoRA adapter.

1. **Time.** SmolLM2-135M-Instruct (lorakit.assets) with an adapter on every linear layer of its 30 decoder blocks
   (210 layers): ``to_lora`` of a LoRA (r=16; its change is rank 16: decomposed from its thin factors) and of a DoRA
   (r=16; its magnitude makes the change full-rank: one dense SVD per layer), exact and at rank 16, and
   ``uniform_lora_factors`` (what the GGUF writer calls). Wall-clock medians of ``--repeats`` runs after one warm-up.
2. **DoRA -> LoRA error against rank.** DoRA (r=16, all linear layers) trained ``--steps`` steps on chatterbot
   conversations, then converted at ranks 1 ... 576 (= exact for 576-wide layers): per rank the largest and median
   per-layer relative error ``‖ΔW − BA‖_F / ‖ΔW‖_F`` and the largest ``|Δlogit|`` between the DoRA model and the
   converted LoRA on held-out conversations. Plot: ``results/to_lora_dora_rank.png``.

Example (tiny model, seconds):
    .venv/bin/python benchmarks/bench_to_lora.py --quick
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lorakit  # noqa: E402
from common import RESULTS, SIZES, Table, base_parser, build_base, metadata, set_threads, write_results  # noqa: E402
from lorakit.convert import uniform_lora_factors  # noqa: E402
from lorakit.registry import adapted_layers  # noqa: E402

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 576)


def load_model(quick: bool):
    """(model, tokenizer or None): SmolLM2-135M-Instruct, or the quick tiny Llama."""
    if quick:
        return build_base(SIZES["quick"]).eval(), None
    from lorakit.assets import smollm2_path
    from lorakit.train.job import load_base

    model, tok = load_base(smollm2_path(), "lm")
    return model.eval(), tok


def as_if_trained(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_section(model, repeats: int) -> tuple[Table, dict]:
    """LoRA (r=16, as if trained): exact, rank 16 and the GGUF factors, ``repeats`` runs each after a warm-up. The DoRA
    conversion (a dense SVD of every layer) is timed once, on the trained DoRA adapter of :func:`rank_section`."""
    import warnings

    table = Table("to_lora on every linear layer", ["adapter", "conversion", "layers", "runs", "median s",
                                                    "max rel error"])
    data = {}
    for method in ("lora",):
        lorakit.attach(model, lorakit.AdapterConfig(method=method, r=16, seed=0), name=method)
        as_if_trained(model)
        n_layers = sum(1 for _, layer in adapted_layers(model) if method in layer.adapters)
        runs = repeats if method == "lora" else 1
        for label, kwargs in (("exact", {}), ("rank 16", {"rank": 16})):
            reports = []

            def run():
                reports.append(lorakit.to_lora(model, method, new_name="converted", **kwargs))
                lorakit.delete(model, "converted")

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 16 of a DoRA change is not exact: measured below
                if method == "lora" and label == "exact":
                    run()  # warm-up: the first QR/SVD calls initialise LAPACK's workspaces
                seconds = timed(run, runs)
            table.add(method, label, n_layers, runs, seconds, reports[-1].max_rel_error)
            print(f"[to_lora] {method} {label}: {seconds:.2f} s", flush=True)
            data[f"{method} {label}"] = seconds
        if method == "lora":
            seconds = timed(lambda: uniform_lora_factors(model, method), repeats)
            table.add(method, "uniform_lora_factors (GGUF)", n_layers, repeats, seconds, 0.0)
            data[f"{method} uniform"] = seconds
        lorakit.delete(model, method)
    table.notes.append("LoRA is decomposed from its thin factors (QR + an r×r SVD per layer); DoRA's change is "
                       "full-rank, so each layer takes a dense SVD")
    return table, data


def chat_batches(tok, n_train: int, n_eval: int, max_length: int = 64):
    from lorakit.assets import chatterbot_pairs

    pairs = chatterbot_pairs()
    texts = [tok.apply_chat_template([{"role": "user", "content": p["question"]},
                                      {"role": "assistant", "content": p["answer"]}], tokenize=False)
             for p in pairs]
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(texts), generator=gen).tolist()
    held_out = [texts[i] for i in order[:n_eval]]
    train = [texts[i] for i in order[n_eval:n_eval + n_train]]

    def encode(rows):
        enc = tok(rows, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    return [encode(train[i:i + 4]) for i in range(0, len(train), 4)], encode(held_out)


def rank_section(model, tok, steps: int, ranks: tuple[int, ...]) -> tuple[Table, dict]:
    lorakit.attach(model, lorakit.AdapterConfig(method="dora", r=16, alpha=32, seed=0))
    if tok is None:  # quick: random tokens
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SIZES["quick"].vocab, (4, 16), generator=gen)
        batches, held = [{"input_ids": ids, "labels": ids}], {"input_ids": ids[:2]}
    else:
        batches, held = chat_batches(tok, n_train=4 * steps, n_eval=8)
        held = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}
    opt = lorakit.make_optimizer("adamw", model, lr=1e-3)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        want = model(**held).logits
    data_name = "chatterbot" if tok is not None else "random tokens"
    table = Table(f"DoRA (r=16, {steps} steps on {data_name}) as plain LoRA: error against rank",
                  ["rank", "max rel error", "median rel error", "layers exact", "max abs Δlogit (held out)"])
    # One exact conversion (one SVD per layer); its factors come ordered by singular value (√σ in A's rows and B's
    # columns), so to_lora(rank=k) is exactly its first k triplets: each rank's adapter is the exact one with the
    # rest zeroed, and each layer's error follows from its singular values σ_i = ‖B[:, i]‖·‖A[i]‖.
    t0 = time.perf_counter()
    report = lorakit.to_lora(model, new_name="converted")
    seconds = time.perf_counter() - t0
    print(f"[to_lora] dora exact (trained): {seconds:.2f} s", flush=True)
    factors = {path: (layer.adapters["converted"].A.detach().clone(), layer.adapters["converted"].B.detach().clone())
               for path, layer in adapted_layers(model)}
    sigma2 = {path: (b.norm(dim=0) * a.norm(dim=1)) ** 2 for path, (a, b) in factors.items()}
    exact_rank = {layer.path: layer.exact_rank for layer in report.layers}
    curve = {}
    widest = max(int(s2.numel()) for s2 in sigma2.values())
    for k in sorted({min(k, widest) for k in ranks}):
        errors, exact = [], 0
        for path, layer in adapted_layers(model):
            a, b = factors[path]
            keep = min(k, a.shape[0])
            with torch.no_grad():
                adapter = layer.adapters["converted"]
                adapter.A.zero_()[:keep] = a[:keep]
                adapter.B.zero_()[:, :keep] = b[:, :keep]
            s2 = sigma2[path]
            errors.append(float((s2[keep:].sum() / s2.sum()).sqrt()) if s2.sum() > 0 else 0.0)
            exact += keep >= exact_rank[path]
        lorakit.set_active(model, "converted")
        with torch.no_grad():
            diff = float((model(**held).logits - want).abs().max())
        lorakit.set_active(model, "default")
        table.add(k, max(errors), statistics.median(errors), f"{exact}/{len(errors)}", diff)
        print(f"[to_lora] rank {k}: max rel error {max(errors):.3g}, max abs dlogit {diff:.3g}", flush=True)
        curve[k] = {"max": max(errors), "median": statistics.median(errors), "logit": diff}
    lorakit.delete(model, "converted")
    table.notes.append(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}; ranks are capped per layer at the "
                       f"change's numerical rank (exact there)")
    lorakit.delete(model, "default")
    return table, {"curve": curve, "losses": losses, "dora_exact_seconds": seconds,
                   "dora_layers": len(report.layers)}


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted(curve)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(ranks, [max(curve[k]["max"], 1e-8) for k in ranks], "o-", label="largest layer rel. error")
    ax.plot(ranks, [max(curve[k]["median"], 1e-8) for k in ranks], "s--", label="median layer rel. error")
    ax.plot(ranks, [max(curve[k]["logit"], 1e-8) for k in ranks], "^:", label="max |Δlogit| (held out)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank of the conversion")
    ax.set_ylabel("error")
    ax.set_title("DoRA -> plain LoRA (SmolLM2-135M, every linear layer)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = base_parser("to_lora on SmolLM2: time, and DoRA -> LoRA error against rank")
    p.add_argument("--steps", type=int, default=None, help="DoRA training steps (default 30; quick: 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; quick: 1)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    steps = args.steps or (3 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 3)
    model, tok = load_model(args.quick)
    timing, timing_data = time_section(model, repeats)
    ranks, rank_data = rank_section(model, tok, steps, RANKS)
    timing.add("dora (trained)", "exact", rank_data["dora_layers"], 1, rank_data["dora_exact_seconds"], 0.0)
    out_dir = args.out or RESULTS
    suffix = "_quick" if args.quick else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"to_lora_dora_rank{suffix}.png"
    plot(rank_data["curve"], png)
    ranks.notes.append(f"plot: {png.name}")
    meta = metadata(argv=None if argv is None else [sys.argv[0], *argv], threads=args.threads)
    write_results(f"to_lora{suffix}", [timing, ranks], meta, {"timing": timing_data, **rank_data}, out_dir)
    return {"tables": [timing, ranks], "data": {"timing": timing_data, **rank_data}, "png": png}


if __name__ == "__main__":
    main()
