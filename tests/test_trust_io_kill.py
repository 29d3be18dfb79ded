"""Issue 11, items 1-2: a process SIGKILLed in the middle of saving an adapter over an existing one leaves a folder that
loads as the old or the new adapter (or, killed exactly between the two final renames, refuses clearly); the other
files survive and the next save cleans the killed save's temporaries."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterLoadError

SRC = str(Path(lorakit.__file__).resolve().parents[1])
pytestmark = pytest.mark.slow  # real processes, a few seconds each: CI's second step

CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    import lorakit, lorakit.io

    folder, mode, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def model(i):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0", "2"]))
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.fill_(0.01 * (i + 1))
        return net

    lorakit.save(model(0), folder)          # the old adapter
    print("saved 0", flush=True)
    if mode == "at":                         # die at the arg-th call of os.replace of the next save
        real, calls = os.replace, [0]
        def replace(*a, **k):
            calls[0] += 1
            if calls[0] == arg:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        os.replace = replace
        lorakit.save(model(1), folder)
        print("finished", flush=True)
    else:                                    # save again and again until killed
        i = 1
        while True:
            lorakit.save(model(i), folder)
            print(f"saved {i}", flush=True)
            i += 1
""")

X = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))


def candidate(i: int) -> torch.Tensor:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0", "2"]))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.fill_(0.01 * (i + 1))
        return net(X)


def load_outputs(folder: Path) -> torch.Tensor:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    lorakit.load(net, folder)
    with torch.no_grad():
        return net(X)


def run_child(tmp_path: Path, folder: Path, mode: str, arg: int) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(folder), mode, str(arg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def prepare(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.jsonl").write_text('{"step": 1}\n')
    (folder / "ckpt-5").mkdir()
    (folder / "ckpt-5" / "state.json").write_text("{}")
    return folder


def others_intact(folder: Path) -> bool:
    return ((folder / "log.jsonl").read_text() == '{"step": 1}\n'
            and (folder / "ckpt-5" / "state.json").read_text() == "{}")


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in list(folder.iterdir()) + list(folder.parent.iterdir()) if "lorakit-tmp" in p.name]


@pytest.mark.parametrize("kill_at", [1, 2])
def test_sigkill_at_each_rename_of_an_overwrite(tmp_path, kill_at):
    """The overwrite renames the weights (call 1), then the config (call 2): killed before the first, the old adapter
    loads; killed between them, load refuses with a clear error. The next save repairs the folder and removes the
    killed save's temporaries."""
    folder = prepare(tmp_path)
    proc = run_child(tmp_path, folder, "at", kill_at)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert "finished" not in out
    assert others_intact(folder)
    assert temporaries(folder), "the killed save should have left its temporary folder"
    if kill_at == 1:
        assert torch.equal(load_outputs(folder), candidate(0))
    else:
        with pytest.raises(AdapterLoadError, match="interrupted"):
            load_outputs(folder)
    # the next save repairs the folder and removes the dead process's temporaries, nothing else
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0", "2"]))
    lorakit.save(net, folder)
    assert temporaries(folder) == [] and others_intact(folder)
    with torch.no_grad():
        assert torch.equal(load_outputs(folder), net(X))


def test_sigkill_during_a_save_loop_leaves_the_old_or_the_new_adapter(tmp_path):
    folder = prepare(tmp_path)
    for delay in (0.0, 0.021):
        proc = run_child(tmp_path, folder, "loop", 0)
        last = -1
        while last < 2:  # a few complete overwrites first
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            last = int(line.split()[1])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        for line in rest.splitlines():
            last = max(last, int(line.split()[1]))
        assert others_intact(folder)
        try:
            got = load_outputs(folder)
        except AdapterLoadError as err:  # killed exactly between the two renames: refused, never mixed
            assert "interrupted" in str(err)
            continue
        assert any(torch.equal(got, candidate(i)) for i in (last, last + 1)), "neither the old nor the new adapter"
