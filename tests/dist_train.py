"""Launched by tests/test_distributed.py, under torchrun (2 processes) or alone: trains a tiny Llama and saves.

Args: out_dir strategy method steps [--stop-at N] [--resume] [--dump DIR] [--eval]
"""
from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_llama  # noqa: E402

import lorakit  # noqa: E402
from lorakit.train.trainer import TrainConfig, Trainer  # noqa: E402

METHOD_OPTIONS = {
    "lora": {}, "dora": {},
    "adalora": {"r": 6, "target_r": 2, "total_steps": 8, "t_init": 1, "t_final": 2, "delta_t": 1},
    "sora": {}, "delta_lora": {"delta_start": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("strategy")
    ap.add_argument("method")
    ap.add_argument("steps", type=int)
    ap.add_argument("--stop-at", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--dump", default="")
    ap.add_argument("--eval", action="store_true", help="evaluate (after finish too) on 8 held-out examples")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out).resolve()
    if rank != 0:  # only rank 0 may write into the run folder
        real_open = builtins.open

        def guarded_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and str(Path(file).resolve()).startswith(str(out)):
                raise AssertionError(f"rank {rank} wrote {file}")
            return real_open(file, mode, *a, **k)

        builtins.open = guarded_open
        import safetensors.torch as st

        def guarded_save(tensors, filename, *a, **k):
            raise AssertionError(f"rank {rank} wrote {filename}")

        st.save_file = guarded_save
    model = tiny_llama(seed=0)
    opts = {"r": 4, "alpha": 8, "seed": 0, "targets": ["q_proj", "v_proj", "up_proj"],
            **METHOD_OPTIONS[args.method]}
    lorakit.attach(model, lorakit.AdapterConfig(method=args.method, **opts))
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(64):
        ids = torch.randint(0, 128, (12,), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids})
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if args.stop_at and calls["n"] == args.stop_at:
            trainer._stop_requested = True  # what Ctrl-C does, on every rank
        return m(**batch).loss

    cfg = TrainConfig(steps=args.steps, batch_size=8, lr=1e-2, warmup_steps=0, schedule="constant", seed=0,
                      distributed=args.strategy, output_dir=str(out), progress=False, log_every=1,
                      resume=str(out) if args.resume else None, max_grad_norm=None)
    trainer = Trainer(model, cfg, data[:56] if args.eval else data, eval_data=data[56:] if args.eval else None,
                      loss_fn=loss_fn, task="lm")
    result = trainer.train()
    if args.dump:  # per-rank fingerprint of everything the methods change (adapter tensors and base weights)
        digest = hashlib.sha256()
        full = {}
        for name, t in sorted(model.state_dict().items()):
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            full[name] = t
            digest.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
        Path(args.dump).mkdir(parents=True, exist_ok=True)
        with builtins.__dict__.get("_real_open", open)(os.path.join(args.dump, f"rank{rank}.json"), "w") as fh:
            fh.write(json.dumps({"sha": digest.hexdigest(), "losses": result.losses, "evals": result.evals}))


if __name__ == "__main__":
    main()
