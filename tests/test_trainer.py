"""The trainer: loss goes down, logs and checkpoints are written, resume is exact, schedules are right."""
from __future__ import annotations

import copy
import csv
import json
import os
import signal

import pytest
import torch
from conftest import tiny_llama

import lorakit
from lorakit import AdapterConfig
from lorakit.train.trainer import TrainConfig, Trainer, lr_lambda


def lm_data(n=48, length=12, seed=0, starts=128):
    """A learnable toy language: each sequence counts up from a random start (one of ``starts``, mod 128)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, starts, (1,), generator=g))
        ids = (torch.arange(length) + start) % 128
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids})
    return rows


def make_model(dropout=0.1, head=False):
    model = tiny_llama(seed=0)
    # a random tiny model's lm_head (std 0.02) yields near-uniform logits; training it lets the loss move quickly
    lorakit.attach(model, AdapterConfig(r=4, alpha=8, dropout=dropout, seed=0,
                                        modules_to_save=["lm_head"] if head else []))
    return model


def test_loss_goes_down_and_logs_are_written(tmp_path):
    model = make_model(head=True)
    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-2, warmup_steps=3, log_every=5, eval_every=10,
                      output_dir=str(tmp_path / "run"), progress=False)
    # few distinct sequences: a tiny random model memorises them quickly, so the drop is large and reliable
    result = Trainer(model, cfg, lm_data(starts=4), eval_data=lm_data(8, seed=1, starts=4), task="lm").train()
    assert len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < 0.8 * sum(result.losses[:5]) / 5
    assert result.evals[-1]["perplexity"] < result.evals[0]["perplexity"]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20, 30]
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert len(rows) == len(records) and float(rows[0]["loss"]) == pytest.approx(records[0]["loss"])
    fresh = tiny_llama(seed=0)
    lorakit.load(fresh, run / "adapter")
    ids = lm_data(2, seed=3)[0]["input_ids"][None]
    model.eval()
    assert torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-5)


def test_ctrl_c_checkpoints_and_resume_is_exact(tmp_path, capsys):
    data = lm_data()
    base = dict(steps=12, batch_size=6, lr=3e-3, warmup_steps=2, grad_accum=2, schedule="cosine", progress=False,
                log_every=1)
    full = Trainer(make_model(), TrainConfig(**base, output_dir=str(tmp_path / "full")), data).train()

    calls = {"n": 0}

    def interrupting_loss(model, batch):  # a real SIGINT during the 7th optimiser step
        calls["n"] += 1
        if calls["n"] == 7 * base["grad_accum"]:
            os.kill(os.getpid(), signal.SIGINT)
        return model(**batch).loss

    part = Trainer(make_model(), TrainConfig(**base, output_dir=str(tmp_path / "part")), data,
                   loss_fn=interrupting_loss).train()
    assert part.interrupted and len(part.losses) == 7
    assert (tmp_path / "part" / "ckpt-7").exists() and not (tmp_path / "part" / "adapter").exists()
    assert "--resume" in capsys.readouterr().err
    resumed = Trainer(make_model(), TrainConfig(**base, output_dir=str(tmp_path / "part"),
                                                resume=str(tmp_path / "part")), data).train()
    # bit-for-bit: dropout RNG, data order, optimiser and scheduler state all restored
    assert resumed.losses[:7] == part.losses  # history restored from the checkpoint
    assert resumed.losses == full.losses


def test_keep_last_prunes_checkpoints(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, save_every=2, keep_last=2, output_dir=str(tmp_path), progress=False)
    Trainer(make_model(dropout=0.0), cfg, lm_data(16)).train()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-4", "ckpt-6"]


def test_schedules():
    cfg = TrainConfig(steps=10, warmup_steps=2, schedule="linear")
    f = lr_lambda(cfg)
    assert [f(0), f(1)] == [0.5, 1.0] and f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == 0.0
    g = lr_lambda(TrainConfig(steps=10, warmup_steps=0, schedule="cosine"))
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(TrainConfig(steps=10, schedule="constant"))(7) == 1.0


def test_bad_config_and_no_trainable_params():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    model = tiny_llama()
    with pytest.raises(ValueError, match="no trainable parameters"):
        for p in model.parameters():
            p.requires_grad_(False)
        Trainer(model, TrainConfig(steps=1, progress=False), lm_data(4)).train()


def test_bf16_autocast_and_gradient_checkpointing_train():
    model = make_model(dropout=0.0)
    cfg = TrainConfig(steps=3, batch_size=4, bf16=True, gradient_checkpointing=True, progress=False)
    result = Trainer(model, cfg, lm_data(8)).train()
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_model_without_adapters_trains_saves_and_resumes(tmp_path):
    """Full fine-tuning / head-only baselines go through the same trainer (trainable tensors are saved)."""
    def model():
        m = tiny_llama(seed=0)
        for n, p in m.named_parameters():
            p.requires_grad_(n.startswith("lm_head"))
        return m

    base = dict(steps=4, batch_size=4, lr=1e-2, progress=False, log_every=1, schedule="constant")
    full = Trainer(model(), TrainConfig(**base, output_dir=str(tmp_path / "a")), lm_data(16)).train()
    assert (tmp_path / "a" / "adapter" / "trainable.safetensors").exists()
    Trainer(model(), TrainConfig(**{**base, "steps": 2}, output_dir=str(tmp_path / "b"), save_every=1),
            lm_data(16)).train()
    resumed = Trainer(model(), TrainConfig(**base, output_dir=str(tmp_path / "b"), resume=str(tmp_path / "b")),
                      lm_data(16)).train()
    assert resumed.losses == full.losses


def test_group_by_length_batches_similar_lengths_and_covers_the_epoch():
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.ones(int(n), dtype=torch.long)} for n in torch.randint(1, 100, (64,), generator=g)]
    trainer = Trainer(torch.nn.Linear(2, 2), TrainConfig(batch_size=8, group_by_length=True, progress=False), data)
    gen = trainer._batch_indices(0)
    batches = [next(gen) for _ in range(8)]  # one epoch
    assert sorted(i for b in batches for i in b) == list(range(64))
    spread = [max(len(data[i]["input_ids"]) for i in b) - min(len(data[i]["input_ids"]) for i in b) for b in batches]
    plain = Trainer(torch.nn.Linear(2, 2), TrainConfig(batch_size=8, progress=False), data)._batch_indices(0)
    plain_spread = [max(len(data[i]["input_ids"]) for i in b) - min(len(data[i]["input_ids"]) for i in b)
                    for b in (next(plain) for _ in range(8))]
    assert sum(spread) < 0.3 * sum(plain_spread)
    again = Trainer(torch.nn.Linear(2, 2), TrainConfig(batch_size=8, group_by_length=True, progress=False), data)
    assert [next(again._batch_indices(0))] == batches[:1]  # seeded: same order every time


def test_fsdp_is_refused_up_front_for_a_member_whose_hooks_need_whole_tensors():
    """A registered member declaring ``shardable = False`` is refused before anything is sharded (the built-in hook
    methods, AdaLoRA, SoRA and Delta-LoRA, shard: tests/test_distributed.py trains them under FSDP2)."""
    import lorakit
    from lorakit.methods import register_method
    from lorakit.methods.lora import LoraAdapter
    from lorakit.train.distributed import DistInfo, check_shardable, wrap

    class WholeTensorLora(LoraAdapter):
        method = "whole_tensor_lora"
        shardable = False

    register_method("whole_tensor_lora", WholeTensorLora)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))
    lorakit.attach(net, lorakit.AdapterConfig(method="whole_tensor_lora", r=2))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=r"cannot train whole_tensor_lora adapters.*use strategy 'ddp'"):
        wrap(net, "fsdp", DistInfo(rank=0, world_size=2))
    # nothing was sharded or changed
    assert all(type(p) is torch.nn.Parameter for p in net.parameters())
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())
    for method, extra in [("lora", {}), ("sora", {}), ("delta_lora", {}),
                          ("adalora", {"total_steps": 4, "target_r": 1})]:
        plain = torch.nn.Sequential(torch.nn.Linear(6, 6))
        lorakit.attach(plain, lorakit.AdapterConfig(method=method, r=2, **extra))
        check_shardable(plain)  # shards: no error
