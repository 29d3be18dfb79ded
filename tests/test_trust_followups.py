"""Trust (issue 11), gaps an audit found after the first pass: the exit code after a signal stop, atomic run files,
where `--resume` writes, a rank change on resume, `python -m lorakit`, PEFT folders that name their base, and
refusals in combine / set_active / long adapter names. Driven through the public API and the real CLI."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import lorakit
from test_cli import run  # the in-process CLI runner the CLI tests share
from test_trust_cli import no_progress_bars, one_line_error, train_argv, trained, trained_once  # noqa: F401


# -- a signal stop exits 128 + signal, after the result and the resume line ---------------------------------------
@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_train_stopped_by_a_signal_exits_128_plus_the_signal(trained, capsys, monkeypatch, signum, code, name):
    from lorakit.train import data as data_mod

    model_dir, data, _ = trained
    out_dir = trained[2].parent / "stopped"
    collate, sent = data_mod.Collator.__call__, []

    def collate_and_signal(self, rows):  # a real signal to this process while the first step runs
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return collate(self, rows)

    monkeypatch.setattr(data_mod.Collator, "__call__", collate_and_signal)
    rc, out, err = run(train_argv(model_dir, data, out_dir, "--steps", "5", "--r", "2"), capsys)
    assert rc == code, err
    summary = json.loads(out)
    assert summary["interrupted"] and summary["stop_signal"] == name  # the result is printed before the exit
    assert f"--resume {out_dir}" in err and (out_dir / "ckpt-1").is_dir() and not (out_dir / "adapter").exists()
