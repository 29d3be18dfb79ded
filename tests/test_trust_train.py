"""Trust (issue 11), trainer side: SIGTERM and exceptions checkpoint, corrupt checkpoints fall back, resumed logs
have no duplicates, NaN stops training, optimiser mismatch and merged adapters are refused up front.

Fault injection with real subprocesses (SIGKILL/SIGTERM) is in test_trust_train_faults.py.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train.trainer import NonFiniteLossError, TrainConfig, Trainer


def make_model(dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    lorakit.attach(net, lorakit.AdapterConfig(r=2, dropout=dropout, seed=0))
    return net


def make_data(n: int = 32):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(6, generator=g), "y": torch.randn(3, generator=g)} for _ in range(n)]


def mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


BASE = dict(steps=8, batch_size=4, lr=2e-2, warmup_steps=1, schedule="cosine", log_every=1, progress=False)


def run(tmp, loss_fn=mse, **kw):
    cfg = TrainConfig(**{**BASE, "output_dir": str(tmp), **kw})
    return Trainer(make_model(), cfg, make_data(), loss_fn=loss_fn).train()


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def log_rows(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def loss_at(step_to_fail, exc):
    """A loss function that raises ``exc`` in optimiser step ``step_to_fail`` (1-based)."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == step_to_fail:
            raise exc
        return mse(model, batch)

    return loss_fn


# -- item 3: SIGTERM behaves like Ctrl-C ----------------------------------------------------------------------------
def test_sigterm_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path, capsys):
    full = run(tmp_path / "full")
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))  # old code: this runs, training goes on
    try:
        calls = {"n": 0}

        def terminated_loss(model, batch):  # a real SIGTERM during the 5th optimiser step
            calls["n"] += 1
            if calls["n"] == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return mse(model, batch)

        part = run(tmp_path / "part", loss_fn=terminated_loss)
        assert part.interrupted and len(part.losses) == 5
        assert (tmp_path / "part" / "ckpt-5").is_dir() and not (tmp_path / "part" / "adapter").exists()
        err = capsys.readouterr().err
        assert "SIGTERM" in err and "--resume" in err
        # the previous handler is back in place
        assert signal.getsignal(signal.SIGTERM) is not None and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part"))
    assert resumed.losses == full.losses


# -- item 3: an exception checkpoints the last completed step -------------------------------------------------------
def test_exception_before_the_update_checkpoints_the_last_completed_step(tmp_path, capsys):
    full = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="out of memory"):
        run(tmp_path / "oom", loss_fn=loss_at(6, RuntimeError("CUDA out of memory (simulated)")))
    assert sorted(p.name for p in (tmp_path / "oom").glob("ckpt-*")) == ["ckpt-5"]
    assert not (tmp_path / "oom" / "adapter").exists()
    err = capsys.readouterr().err
    assert "ckpt-5" in err and "--resume" in err
    resumed = run(tmp_path / "oom", resume=str(tmp_path / "oom"))
    assert resumed.losses == full.losses  # the checkpoint is exactly the state after step 5 (RNG included)


def test_exception_inside_the_optimizer_step_writes_no_checkpoint(tmp_path, capsys):
    """A failing optimizer.step() may have updated some parameters: no checkpoint of that state is written."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def half_step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():  # half an update, then a failure
                self.param_groups[0]["params"][0].add_(1.0)
            raise RuntimeError("simulated failure inside optimizer.step")
        return original(self, closure)

    torch.optim.AdamW.step = half_step
    try:
        with pytest.raises(RuntimeError, match="inside optimizer.step"):
            run(tmp_path / "run", save_every=2)
    finally:
        torch.optim.AdamW.step = original
    # ckpt-2 (periodic) is the newest; nothing was written for the half-applied step 4 or for step 3
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-2"]
    assert "no checkpoint" in capsys.readouterr().err


def test_exception_after_a_trained_modules_buffers_changed_writes_no_checkpoint(tmp_path, capsys):
    """A forward in train mode updates a trained BatchNorm's running statistics: that is no longer step 3's state."""
    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 3))
        lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0", "2"], modules_to_save=["1"]))
        return net

    cfg = TrainConfig(**{**BASE, "output_dir": str(tmp_path)})
    calls = {"n": 0}

    def fails_after_forward(net, batch):
        calls["n"] += 1
        loss = mse(net, batch)  # the forward has updated the running statistics
        if calls["n"] == 4:
            raise RuntimeError("after forward")
        return loss

    with pytest.raises(RuntimeError, match="after forward"):
        Trainer(model(), cfg, make_data(), loss_fn=fails_after_forward).train()
    assert not list(tmp_path.glob("ckpt-*"))
    assert "buffers" in capsys.readouterr().err


# -- item 11: the NaN policy ----------------------------------------------------------------------------------------
def test_nan_loss_stops_before_the_update_keeps_the_last_good_state_and_writes_no_adapter(tmp_path):
    calls = {"n": 0}

    def nan_at_4(model, batch):
        calls["n"] += 1
        loss = mse(model, batch)
        return loss * float("nan") if calls["n"] == 4 else loss

    good = run(tmp_path / "good", save_every=3, keep_last=5)
    model = make_model()
    cfg = TrainConfig(**{**BASE, "output_dir": str(tmp_path / "nan")})
    with pytest.raises(NonFiniteLossError, match=r"step 4.*lr") as info:
        Trainer(model, cfg, make_data(), loss_fn=nan_at_4).train()
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert not (tmp_path / "nan" / "adapter").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no update used the NaN
    ckpt3 = tmp_path / "nan" / "ckpt-3" / "adapter" / "lorakit_weights.safetensors"
    same = tmp_path / "good" / "ckpt-3" / "adapter" / "lorakit_weights.safetensors"
    a, b = load_file(str(ckpt3)), load_file(str(same))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the state after step 3
    assert all(torch.isfinite(torch.tensor(good.losses)))


def test_non_finite_gradient_stops_even_without_clipping(tmp_path):
    def nan_grad(model, batch):
        out = model(batch["x"])
        # finite loss (sqrt(0) = 0) whose gradient is 0 * inf = NaN
        return torch.nn.functional.mse_loss(out, batch["y"]) + torch.sqrt((out - out.detach()).abs().sum())

    model = make_model()
    before = trainable(model)
    cfg = TrainConfig(**{**BASE, "max_grad_norm": None})
    with pytest.raises(NonFiniteLossError, match=r"step 1.*gradient"):
        Trainer(model, cfg, make_data(), loss_fn=nan_grad).train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


# -- item 4: a corrupt newest checkpoint falls back to the previous intact one ----------------------------------------
def test_corrupt_newest_checkpoints_fall_back_to_the_newest_intact_one(tmp_path):
    full = run(tmp_path / "full")
    out = tmp_path / "run"
    run(out, save_every=1, keep_last=8)
    (out / "ckpt-8" / "state.json").write_text("{not json")  # bad JSON
    data = (out / "ckpt-7" / "state.safetensors").read_bytes()
    (out / "ckpt-7" / "state.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    w = out / "ckpt-6" / "adapter" / "lorakit_weights.safetensors"
    w.write_bytes(w.read_bytes()[:40])  # corrupt adapter inside
    with pytest.warns(UserWarning) as warned:
        resumed = run(out, resume=str(out))
    text = " ".join(str(w.message) for w in warned)
    assert "ckpt-8" in text and "ckpt-7" in text and "ckpt-6" in text and "ckpt-5" in text
    assert resumed.losses == full.losses
    # the bad checkpoints are kept (moved aside when their step was written again), never deleted
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt-8") and p.name != "ckpt-8")
    assert kept and (out / kept[0] / "state.json").read_text() == "{not json"


def test_a_skipped_corrupt_checkpoint_is_never_pruned(tmp_path):
    out = tmp_path / "run"
    run(out, steps=4, save_every=1, keep_last=2)  # ckpt-3, ckpt-4
    bad = b"\x00" * 7
    (out / "ckpt-4" / "state.safetensors").write_bytes(bad)
    with pytest.warns(UserWarning, match="ckpt-4"):
        run(out, steps=8, save_every=3, keep_last=2, resume=str(out))  # writes ckpt-6 and ckpt-8, prunes ckpt-3
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-4", "ckpt-6", "ckpt-8"]
    assert (out / "ckpt-4" / "state.safetensors").read_bytes() == bad


def test_a_corrupt_explicit_checkpoint_or_no_intact_one_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    run(out, steps=2, save_every=1)
    (out / "ckpt-2" / "state.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"ckpt-2.*(unreadable|corrupt).*ckpt-1"):
        run(out, steps=2, resume=str(out / "ckpt-2"))
    (out / "ckpt-1" / "state.json").write_text("[1, 2")
    model = make_model()
    before = trainable(model)
    with pytest.raises(ValueError, match=r"no intact checkpoint.*ckpt-2.*ckpt-1"):
        Trainer(model, TrainConfig(**{**BASE, "output_dir": str(out), "resume": str(out)}), make_data(),
                loss_fn=mse).train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


# -- item 4: resumed logs have no duplicated rows -------------------------------------------------------------------
def test_a_checkpoint_with_non_finite_state_is_skipped_like_a_corrupt_one(tmp_path):
    # a NaN/inf optimiser moment reads back fine as safetensors; resuming from it used to turn the adapter into NaN
    # at the next step and then write that NaN state as "the last completed" checkpoint
    from safetensors.torch import save_file

    full = run(tmp_path / "full")
    out = tmp_path / "run"
    run(out, save_every=1, keep_last=8)
    state_file = out / "ckpt-8" / "state.safetensors"
    tensors = load_file(str(state_file))
    moment = next(k for k, t in tensors.items() if t.is_floating_point() and t.dim() > 0)
    tensors[moment].view(-1)[0] = float("inf")
    save_file(tensors, str(state_file))
    with pytest.warns(UserWarning, match=r"ckpt-8.*non-finite"):
        resumed = run(out, resume=str(out))
    assert resumed.losses == full.losses
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter" / "lorakit_weights.safetensors")).values())


def test_a_non_finite_training_state_is_never_written_as_a_checkpoint(tmp_path):
    # the loss and the gradient stay finite, but the update makes the adapter NaN (here: a NaN optimiser moment):
    # the checkpoint of that step must not be written as a good one
    def poisoned_step(model, batch):
        loss = mse(model, batch)
        if poisoned_step.calls == 3:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        poisoned_step.calls += 1
        return loss

    poisoned_step.calls = 0
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError):
        run(out, loss_fn=poisoned_step, save_every=1, keep_last=8)
    assert not (out / "adapter").exists()
    for folder in out.glob("ckpt-*"):
        for file in folder.rglob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(str(file)).values() if t.is_floating_point()), file


def test_resume_drops_log_rows_after_the_checkpoint(tmp_path):
    full = run(tmp_path / "full", eval_every=2)
    out = tmp_path / "run"
    run(out, save_every=3, keep_last=5, eval_every=2)
    # as after kill -9 at step 8 before its checkpoint: steps 7-8 are logged, ckpt-6 is the newest
    import shutil

    shutil.rmtree(out / "ckpt-8")
    shutil.rmtree(out / "adapter")
    with open(out / "log.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 9, "lo')  # a half-written last line
    resumed = Trainer(make_model(), TrainConfig(**{**BASE, "output_dir": str(out), "resume": str(out),
                                                   "eval_every": 2}), make_data(), loss_fn=mse).train()
    assert resumed.losses == full.losses

    def key(rows):
        return [(r["kind"], int(r["step"]), r.get("loss"), r.get("lr")) for r in rows]

    assert key(log_rows(out)) == key(log_rows(tmp_path / "full"))
    import csv

    rows = list(csv.DictReader(open(out / "log.csv")))
    ref = list(csv.DictReader(open(tmp_path / "full" / "log.csv")))
    assert [(r["kind"], r["step"], r["loss"]) for r in rows] == [(r["kind"], r["step"], r["loss"]) for r in ref]


@pytest.mark.parametrize("adapter", [dict(method="lora"), dict(method="sora"),
                                     dict(method="adalora", target_r=1, total_steps=8, t_init=1, t_final=2)],
                         ids=lambda a: a["method"])
def test_a_kill_during_the_final_adapter_save_then_resume_equals_an_uninterrupted_run(tmp_path, adapter):
    """Killed after the last step's checkpoint but before adapter/ appeared (it appears in one rename): --resume
    finishes the run exactly as an uninterrupted one, also for members whose end-of-training consolidation changes
    the adapter's shapes (SoRA prunes to a plain LoRA, AdaLoRA to its kept ranks), without a second final eval row."""
    def run_with(out, **kw):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
        lorakit.attach(net, lorakit.AdapterConfig(r=4, seed=0, **adapter))
        cfg = TrainConfig(**{**BASE, "output_dir": str(out), "eval_every": 2, "save_every": 3, **kw})
        return Trainer(net, cfg, make_data(), eval_data=make_data(8), loss_fn=mse).train()

    full = run_with(tmp_path / "full")
    out = tmp_path / "run"
    run_with(out)
    import shutil

    shutil.rmtree(out / "adapter")  # the state a kill -9 between the final checkpoint and the adapter's rename leaves
    resumed = run_with(out, resume=str(out))
    assert resumed.losses == full.losses
    a, b = (load_file(str(p / "adapter" / "lorakit_weights.safetensors")) for p in (tmp_path / "full", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def key(rows):
        return [(r["kind"], int(r["step"]), r.get("loss"), r.get("eval_loss")) for r in rows]

    assert key(log_rows(out)) == key(log_rows(tmp_path / "full"))  # one final eval row, as in the full run
    import csv

    def csv_rows(folder):
        return [(r["kind"], r["step"], r["loss"], r["eval_loss"]) for r in csv.DictReader(open(folder / "log.csv"))]

    assert csv_rows(out) == csv_rows(tmp_path / "full")


# -- item 17: resuming with another optimiser is refused clearly ----------------------------------------------------
@pytest.mark.parametrize("change, expected", [({"optimizer": "sgd"}, r"optimizer adamw.*train\.optimizer=adamw"),
                                              ({"loraplus_ratio": 16.0}, r"loraplus_ratio")])
def test_resume_with_another_optimizer_is_refused_before_anything_changes(tmp_path, change, expected):
    out = tmp_path / "run"
    run(out, steps=2, save_every=1)
    model = make_model()
    before = trainable(model)
    with pytest.raises(ValueError, match=expected):
        Trainer(model, TrainConfig(**{**BASE, "output_dir": str(out), "resume": str(out), **change}), make_data(),
                loss_fn=mse).train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


# -- item 9: training while merged is refused up front --------------------------------------------------------------
def test_training_a_merged_adapter_is_refused_up_front(tmp_path):
    model = make_model()
    lorakit.merge(model)
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'default' is merged.*lorakit\.unmerge\(model\)"):
        Trainer(model, TrainConfig(**{**BASE, "output_dir": str(tmp_path)}), make_data(), loss_fn=mse).train()
    assert all(torch.equal(weights[n], t) for n, t in model.state_dict().items())
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_train_with_a_diverging_lr_exits_non_zero_with_one_line_and_no_adapter(tmp_path, tiny_chat_folder,
                                                                                  capsys):
    from lorakit.cli import main

    model_dir, data = tiny_chat_folder
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main(["train", "--model", str(model_dir), "--data", str(data), "--steps", "6", "--lr", "1e30",
              "--output-dir", str(out_dir), "--set", "train.progress=false", "--set", "max_length=32",
              "--set", "train.max_grad_norm=null"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not finite" in errors[0] and "train.lr" in errors[0]
    assert not (out_dir / "adapter").exists()


def test_training_outside_the_main_thread_leaves_signal_handlers_alone(tmp_path):
    import threading

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    results, errors = [], []

    def work():
        try:
            results.append(run(tmp_path, steps=2))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not errors and len(results[0].losses) == 2
    assert {s: signal.getsignal(s) for s in before} == before
