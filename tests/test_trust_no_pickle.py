"""Trust (issue 11), the "no pickle" promise: a whole save / load / train / checkpoint / resume cycle, in lorakit's
format and PEFT's, never calls an unpickler. Every unpickling entry point is replaced by one that fails the test."""
from __future__ import annotations

import pickle

import pytest
import torch

import lorakit
from lorakit.train.trainer import TrainConfig, Trainer


class Unpickled(AssertionError):
    pass


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise Unpickled("something was unpickled")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    # the guard itself must work, or this test proves nothing
    with pytest.raises(Unpickled):
        pickle.loads(b"\x80\x04K\x01.")
    with pytest.raises(Unpickled):
        torch.load("anything.pt")


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def data(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(6, generator=g), "y": torch.randn(3, generator=g)} for _ in range(n)]


def mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


@pytest.mark.parametrize("fmt", ["lorakit", "peft"])
def test_save_and_load_never_unpickle(tmp_path, no_unpickling, fmt):
    model = net()
    lorakit.attach(model, lorakit.AdapterConfig(r=2, targets=["0"], modules_to_save=["2"], seed=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = torch.randn(4, 6)
    want = model(x)
    folder = lorakit.save(model, tmp_path / "adapter", format=fmt)
    fresh = net()
    lorakit.load(fresh, folder)
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=1e-6)


def test_training_checkpoints_and_resume_never_unpickle(tmp_path, no_unpickling):
    def model():
        m = net()
        lorakit.attach(m, lorakit.AdapterConfig(r=2, seed=0))
        return m

    base = dict(steps=6, batch_size=4, lr=1e-2, progress=False, save_every=2, output_dir=str(tmp_path / "run"))
    first = Trainer(model(), TrainConfig(**{**base, "steps": 4}), data(), loss_fn=mse).train()
    resumed = Trainer(model(), TrainConfig(**base, resume=str(tmp_path / "run")), data(), loss_fn=mse).train()
    assert len(first.losses) == 4 and len(resumed.losses) == 6
    assert resumed.losses[:4] == first.losses
