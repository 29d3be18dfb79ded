"""Fault injection with real processes: a training run is killed (SIGKILL) during a step and during a checkpoint
write, and stopped with SIGTERM; every resumed run must end exactly where an uninterrupted run ends (losses,
adapter tensors, log rows) with no temporary folders left behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SRC = Path(__file__).resolve().parents[1] / "src"  # this checkout's lorakit, wherever the tests run from
pytestmark = pytest.mark.slow  # real processes, a few seconds each: CI's second step
STEPS = 20

CHILD = r'''
import json, os, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)  # the same reductions in every process: results comparable bit for bit
import lorakit
from lorakit.train import checkpoint as ckpt
from lorakit.train.trainer import TrainConfig, Trainer

out, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
slow = os.environ.get("TRUST_SLOW_CHECKPOINT")
if slow:  # widen the window of one checkpoint write so the parent can kill us inside it
    original = ckpt.write_checkpoint

    def write_checkpoint(folder, parts, adapter_writer):
        def writer(path):
            adapter_writer(path)
            if Path(folder).name == slow:
                time.sleep(60)
        return original(folder, parts, writer)

    ckpt.write_checkpoint = write_checkpoint

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
lorakit.attach(net, lorakit.AdapterConfig(r=2, dropout=0.1, seed=0))
g = torch.Generator().manual_seed(0)
data = [{"x": torch.randn(6, generator=g), "y": torch.randn(3, generator=g)} for _ in range(32)]


def loss_fn(model, batch):
    time.sleep(0.1)  # a step long enough to be hit between checkpoints
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


cfg = TrainConfig(steps=steps, batch_size=4, lr=2e-2, warmup_steps=2, schedule="cosine", save_every=3, keep_last=2,
                  log_every=1, eval_every=5, progress=False, output_dir=out,
                  resume=out if mode == "resume" else None)
result = Trainer(net, cfg, data, eval_data=data[:8], loss_fn=loss_fn).train()
Path(out, "result.json").write_text(json.dumps({"losses": result.losses, "interrupted": result.interrupted,
                                                "stop_signal": result.stop_signal}))
'''


def start(tmp: Path, out: Path, mode: str, **env_extra: str) -> subprocess.Popen:
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    err = open(tmp / f"stderr-{out.name}-{mode}-{time.monotonic_ns()}.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(script), str(out), mode, str(STEPS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    proc.err_file = err
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    proc.err_file.seek(0)
    return proc.err_file.read()


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    proc.wait(timeout=timeout)
    err = stderr_of(proc)
    assert proc.returncode == 0, err
    return err


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early:\n{stderr_of(proc)}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def rows(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # complete lines only
    return [json.loads(line) for line in lines]


def last_logged(out: Path) -> int:
    return max([r["step"] for r in rows(out) if r["kind"] == "train"], default=0)


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("ckpt-*") if p.name.split("-")[1].isdigit())


def hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def key(log: list[dict]) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss"), r.get("lr"), r.get("eval_loss")) for r in log]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "lorakit_weights.safetensors"))


def assert_same_as(reference: Path, out: Path) -> None:
    ref, got = json.loads((reference / "result.json").read_text()), json.loads((out / "result.json").read_text())
    assert not got["interrupted"] and got["losses"] == ref["losses"]
    a, b = adapter(reference), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [(r["kind"], r["step"]) for r in rows(out)]
    assert len(steps) == len(set(steps))  # no duplicated rows
    assert key(rows(out)) == key(rows(reference))
    assert hidden(out) == []  # no temporary folders left


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    finish(start(tmp, out, "fresh"))
    assert len(json.loads((out / "result.json").read_text())["losses"]) == STEPS
    return out


def test_sigkill_during_a_step_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(tmp_path, out, "fresh")
    wait_for(lambda: last_logged(out) >= 7, proc)  # ckpt-6 is written; step 8 or 9 is running
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    newest = checkpoints(out)[-1]
    assert newest < last_logged(out)  # logged rows after the newest checkpoint: a resume must not repeat them
    finish(start(tmp_path, out, "resume"))
    assert_same_as(reference, out)


def test_sigkill_during_a_checkpoint_write_then_sigterm_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(tmp_path, out, "fresh", TRUST_SLOW_CHECKPOINT="ckpt-9")
    writing = []

    def inside_the_write():
        writing[:] = [p for p in out.glob(".ckpt-9.lorakit-tmp-*") if (p / "state.json").exists()]
        return bool(writing)

    wait_for(inside_the_write, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "ckpt-9").exists() and checkpoints(out)[-1] == 6  # the half-written one never appears
    assert hidden(out)  # the killed write's temporary folder is still there

    proc = start(tmp_path, out, "resume")
    wait_for(lambda: last_logged(out) >= 12, proc)
    proc.send_signal(signal.SIGTERM)
    err = finish(proc)  # the library returns (the `lorakit train` command exits 143: the test below)
    assert "SIGTERM" in err and "--resume" in err
    stopped = json.loads((out / "result.json").read_text())
    assert stopped["interrupted"] and stopped["stop_signal"] == signal.SIGTERM
    assert checkpoints(out)[-1] == last_logged(out)  # the step it was in was finished and checkpointed
    assert hidden(out) == [] and not (out / "adapter").exists()

    finish(start(tmp_path, out, "resume"))
    assert_same_as(reference, out)


def test_lorakit_train_stopped_by_sigterm_exits_143_then_resumes(tmp_path, tiny_classifier_folder):
    """The real command: a scheduler's SIGTERM checkpoints, prints the result and the resume line, then exits
    128 + 15 so `lorakit train ... && lorakit export ...` does not go on; the resume finishes with 0."""
    model_dir, data = tiny_classifier_folder
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "lorakit.cli", "train", "--model", str(model_dir), "--data", str(data),
            "--output-dir", str(out), "--steps", "100000", "--r", "2", "--set", "train.progress=false",
            "--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", "adapter.seed=0"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while last_logged(out) < 2:  # the stop handlers are installed: training is running
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] and summary["stop_signal"] == "SIGTERM"
    assert f"--resume {out}" in stderr and "Traceback" not in stderr
    stopped_at = checkpoints(out)[-1]
    assert stopped_at == summary["steps"] and not (out / "adapter").exists()

    argv[argv.index("100000")] = str(stopped_at + 2)
    done = subprocess.run(argv + ["--resume", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stop_signal"] is None and (out / "adapter").is_dir()
