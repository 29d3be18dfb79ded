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


# -- job.yaml, train_config.json and adapter/lorakit_run.json are written atomically -------------------------------
@pytest.mark.parametrize("victim", ["job.yaml", "lorakit_run.json", "train_config.json"])
def test_a_failing_run_file_write_leaves_the_old_file_whole(trained, capsys, monkeypatch, victim):
    """The disk fills up half way through writing a run file: the previous file stays as it was, and no partial
    file (of any name) is left next to it."""
    import errno
    import pathlib

    from lorakit.io import files

    model_dir, data, out_dir = trained
    target = out_dir / "adapter" / victim if victim == "lorakit_run.json" else out_dir / victim
    before = target.read_bytes()
    neighbours = sorted(p.name for p in target.parent.iterdir())

    def disk_full(path, data: bytes, write_half):
        if os.path.basename(path) == victim or os.path.basename(path).startswith(f".{victim}"):
            write_half(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return None

    write_text, write_new_file = pathlib.Path.write_text, files.write_new_file

    def failing_write_text(self, text, *args, **kwargs):
        disk_full(self, text.encode(), lambda half: write_text(self, half.decode(errors="ignore"), *args, **kwargs))
        return write_text(self, text, *args, **kwargs)

    def failing_write_new_file(path, data):
        disk_full(path, data, lambda half: write_new_file(path, half))
        return write_new_file(path, data)

    monkeypatch.setattr(pathlib.Path, "write_text", failing_write_text)
    monkeypatch.setattr(files, "write_new_file", failing_write_new_file)
    code, _, err = run(train_argv(model_dir, data, out_dir, "--steps", "3", "--r", "2", "--resume", str(out_dir)),
                       capsys)
    assert code != 0 and "No space left" in err and "Traceback" not in err
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == neighbours


# -- --resume writes into the run it resumes ------------------------------------------------------------------------
def resume_argv(model_dir, data, resume, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--set", "train.progress=false",
            "--set", "train.batch_size=8", "--r", "2", "--resume", str(resume), *extra]


@pytest.mark.parametrize("point_at", ["run folder", "checkpoint folder"])
def test_resume_continues_in_the_run_it_resumes(trained, tmp_path, capsys, monkeypatch, point_at):
    import yaml

    model_dir, data, out_dir = trained
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default output folder (runs/train) would be here
    seed = yaml.safe_load((out_dir / "job.yaml").read_text())["adapter"]["seed"]
    resume = out_dir if point_at == "run folder" else out_dir / "ckpt-2"
    code, out, err = run(resume_argv(model_dir, data, resume, "--steps", "4"), capsys)
    assert code == 0, err
    assert json.loads(out)["output_dir"] == str(out_dir) and (out_dir / "ckpt-4").is_dir()
    assert list(elsewhere.iterdir()) == []  # nothing written to runs/train
    assert yaml.safe_load((out_dir / "job.yaml").read_text())["adapter"]["seed"] == seed  # the recorded seed
    steps = [r["step"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and 2 in steps and steps[-1] == 4  # the run's own log goes on


def test_resume_into_another_output_dir_is_refused_naming_both(trained, tmp_path, capsys):
    model_dir, data, out_dir = trained
    other = tmp_path / "other"
    before = sorted(p.name for p in out_dir.iterdir())
    code, _, err = run(resume_argv(model_dir, data, out_dir, "--steps", "4", "--output-dir", str(other)), capsys)
    one_line_error(code, err)
    assert str(out_dir) in err and str(other) in err and "--output-dir" in err
    assert not other.exists() and sorted(p.name for p in out_dir.iterdir()) == before


def test_resume_checks_still_apply_without_output_dir(trained, tmp_path, capsys, monkeypatch):
    model_dir, data, out_dir = trained
    monkeypatch.chdir(tmp_path)
    job_yaml = (out_dir / "job.yaml").read_bytes()
    code, _, err = run(resume_argv(model_dir, data, out_dir, "--steps", "4", "--set", "train.optimizer=sgd"), capsys)
    one_line_error(code, err)
    assert "optimizer" in err and not (tmp_path / "runs").exists()
    assert (out_dir / "job.yaml").read_bytes() == job_yaml  # the refused resume did not rewrite the run's record


def test_dry_run_of_a_resume_shows_the_run_folder(trained, capsys):
    import yaml

    model_dir, data, out_dir = trained
    code, out, err = run(resume_argv(model_dir, data, out_dir / "ckpt-2", "--dry-run"), capsys)
    assert code == 0, err
    assert yaml.safe_load(out)["output_dir"] == str(out_dir)


# -- a resume whose adapter config differs from the checkpoint's names the difference before loading ------------
@pytest.mark.parametrize("extra, words", [(["--r", "4"], ["r=2", "r=4"]),
                                          (["--set", "adapter.method=dora"], ["method='lora'", "method='dora'"])])
def test_resume_with_another_adapter_config_names_it_before_loading(trained, capsys, monkeypatch, extra, words):
    from lorakit.train import job as job_mod

    model_dir, data, out_dir = trained

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the mismatch was found")

    monkeypatch.setattr(job_mod, "load_base", no_loading)
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    argv = train_argv(model_dir, data, out_dir, "--steps", "4", "--resume", str(out_dir), *extra)
    code, _, err = run(argv, capsys)
    one_line_error(code, err)
    assert all(w in err for w in words), err
    assert str(out_dir / "job.yaml") in err and "shapes differ" not in err
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    fix = err.split("resume with the run's own config (")[1].split(")")[0].split()  # the command it suggests
    assert fix[:2] == ["lorakit", "train"]
    code, _, err = run(fix[1:] + ["--set", "train.steps=3", "--set", "train.progress=false"], capsys)
    assert code == 0, err
    assert (out_dir / "ckpt-3").is_dir()


def test_a_config_files_output_dir_yields_to_the_resumed_run(trained, tmp_path, capsys):
    """A moved run resumed with its own job.yaml (which names the old folder) continues where it now is."""
    import shutil

    model_dir, data, out_dir = trained
    moved = tmp_path / "moved"
    shutil.move(str(out_dir), moved)
    code, out, err = run(["train", str(moved / "job.yaml"), "--resume", str(moved), "--set", "train.steps=3",
                          "--set", "train.progress=false"], capsys)
    assert code == 0, err
    assert json.loads(out)["output_dir"] == str(moved) and (moved / "ckpt-3").is_dir() and not out_dir.exists()


# -- python -m lorakit ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # a real interpreter
def test_python_dash_m_lorakit_is_the_lorakit_command(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lorakit" in proc.stdout and all(c in proc.stdout for c in ("train", "export", "predict", "inspect"))
    bad = subprocess.run([sys.executable, "-m", "lorakit", "trian"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)  # the same one-line errors as the console script
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


# -- predict / export on a PEFT folder use its base_model_name_or_path when it is local ---------------------------
def peft_folder(model_dir, folder, base_name):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    lorakit.attach(base, lorakit.AdapterConfig(r=2, seed=0, targets=["query", "value"]))
    with torch.no_grad():
        for p in base.parameters():
            if p.requires_grad:
                p.add_(0.05)  # a visible change
    lorakit.save(base, folder, format="peft", base_model_name_or_path=base_name)
    return folder


def test_peft_folder_predicts_and_exports_on_its_local_base(tiny_classifier_folder, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    model_dir, _ = tiny_classifier_folder
    folder = peft_folder(model_dir, tmp_path / "peft", str(model_dir))
    texts = ["a gorgeous witty film", "dull and boring"]
    code, out, err = run(["predict", str(folder), *texts], capsys)
    assert code == 0, err
    assert str(model_dir) in err and "base_model_name_or_path" in err and "--model" in err  # says what it used
    code, given, err2 = run(["predict", str(folder), *texts, "--model", str(model_dir)], capsys)
    assert code == 0 and out == given and "base_model_name_or_path" not in err2

    code, _, err = run(["export", str(folder), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert not torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight,
                           base.bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("base_name", ["some-org/some-model", "missing/local/folder"])
def test_peft_folder_naming_a_hub_model_still_asks_for_model(tiny_classifier_folder, tmp_path, capsys,
                                                             monkeypatch, base_name):
    from lorakit.train import job as job_mod

    model_dir, _ = tiny_classifier_folder
    folder = peft_folder(model_dir, tmp_path / "peft", base_name)
    monkeypatch.setattr(job_mod, "load_base", lambda *a, **k: pytest.fail("a model was loaded (or fetched)"))
    for argv in (["predict", str(folder), "hello"], ["export", str(folder), "--out", str(tmp_path / "m")]):
        code, _, err = run(argv, capsys)
        one_line_error(code, err)
        assert base_name in err and "--model" in err and not (tmp_path / "m").exists()


# -- combine: a bool is not a weight; DARE without a seed says which one it drew ----------------------------------
def two_adapters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    for n in "ab":
        lorakit.attach(net, lorakit.AdapterConfig(r=2, seed=ord(n), init="gaussian"), name=n)
        with torch.no_grad():
            for layer in (net[0], net[2]):
                layer.adapters[n].B.normal_()  # a non-zero change
    return net


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}, lorakit.adapter_names(net)


@pytest.mark.parametrize("how", ["cat", "task_arithmetic", "dare_linear"])
@pytest.mark.parametrize("flag", [True, False])
def test_combine_refuses_a_bool_weight(how, flag):
    net = two_adapters()
    before, names = snapshot(net)
    extra = {"density": 0.5, "seed": 1} if how == "dare_linear" else {}
    with pytest.raises(ValueError, match=r"combine weight for 'a'.*" + str(flag)) as err:
        lorakit.combine(net, {"a": flag, "b": 0.5}, name="mix", how=how, **extra)
    assert len(str(err.value).splitlines()) == 1
    after, names_after = snapshot(net)
    assert names_after == names and after.keys() == before.keys() and all(torch.equal(after[k], before[k])
                                                                           for k in before)


def test_dare_without_a_seed_says_the_seed_it_drew_and_it_repeats_the_mix():
    net = two_adapters()
    x = torch.randn(5, 6)
    with pytest.warns(UserWarning, match=r"drew seed=\d+") as caught:
        lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="free", how="dare_ties", density=0.5)
    drawn = lorakit.mix_report(net, "free").seed
    assert any(f"seed={drawn}" in str(w.message) for w in caught)
    lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="again", how="dare_ties", density=0.5, seed=drawn)
    lorakit.set_active(net, ["free"])
    first = net(x)
    lorakit.set_active(net, ["again"])
    assert torch.equal(net(x), first)


# -- a merged adapter that owns a head keeps it: switching the head away is refused ---------------------------------
def headed_pair():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x = torch.randn(4, 6)
    with torch.no_grad():
        plain = net(x)
    for n in "ab":
        lorakit.attach(net, lorakit.AdapterConfig(r=2, seed=ord(n), targets=["0"], modules_to_save=["2"],
                                                  init="gaussian"), name=n)
        with torch.no_grad():
            net[0].adapters[n].B.normal_()
            for p in net[2].copies[n].parameters():
                p.add_(0.3 if n == "a" else -0.3)  # each head its own
    return net, x, plain


def test_switching_the_head_of_a_merged_adapter_is_refused_and_changes_nothing():
    net, x, plain = headed_pair()
    lorakit.set_active(net, ["a"])
    with torch.no_grad():
        adapted_a = net(x)
    lorakit.merge(net)
    before, names = snapshot(net)
    for switch in (lambda: lorakit.set_active(net, ["b"]), lambda: lorakit.set_active(net, [])):
        with pytest.raises(ValueError, match=r"'a'.*merged.*unmerge") as err:
            switch()
        assert len(str(err.value).splitlines()) == 1
        after, names_after = snapshot(net)
        assert lorakit.active_adapters(net) == ["a"] and names_after == names
        assert all(torch.equal(after[k], before[k]) for k in before)
        with torch.no_grad():
            assert torch.allclose(net(x), adapted_a, atol=1e-5)
    with pytest.raises(ValueError, match=r"'a'.*merged.*unmerge"):  # a new adapter would take over the head too
        lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0"]), name="c")
    assert lorakit.adapter_names(net) == ["a", "b"]
    with pytest.raises(RuntimeError, match="unmerge"):  # route already refuses merged adapters
        with lorakit.route(net, ["b"] * 4):
            pass
    with lorakit.disabled(net), torch.no_grad():  # the base body and the base head
        assert torch.allclose(net(x), plain, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(net(x), adapted_a, atol=1e-5)
    lorakit.unmerge(net)
    lorakit.set_active(net, ["b"])  # the fix the message gives
    with torch.no_grad():
        assert not torch.allclose(net(x), adapted_a, atol=1e-3)


def test_loading_next_to_a_merged_adapter_with_a_head_is_refused_and_rolled_back(tmp_path):
    net, x, _ = headed_pair()
    folder = lorakit.save(net, tmp_path / "b", names="b")
    lorakit.delete(net, "b")
    lorakit.set_active(net, ["a"])
    lorakit.merge(net)
    before, names = snapshot(net)
    with torch.no_grad():
        y = net(x)
    with pytest.raises(ValueError, match=r"'a'.*merged.*unmerge"):
        lorakit.load(net, folder)
    after, names_after = snapshot(net)
    assert names_after == names == ["a"] and lorakit.active_adapters(net) == ["a"]
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(net(x), y)


# -- adapter names longer than a file name can be are refused up front ---------------------------------------------
LONGEST = "é" * 127 + "x"  # 255 bytes in UTF-8: the longest folder name most file systems allow
TOO_LONG = "é" * 128  # 256 bytes: PEFT's per-adapter subfolder could not be created


def test_the_longest_name_saves_in_peft_layout_and_loads_back(tmp_path):
    net = two_adapters()
    lorakit.combine(net, {"a": 0.5, "b": 0.5}, name=LONGEST, how="cat")
    folder = lorakit.save(net, tmp_path / "peft", format="peft")
    assert (folder / LONGEST).is_dir()
    fresh = two_adapters()
    lorakit.delete(fresh, "a")
    lorakit.delete(fresh, "b")
    lorakit.load(fresh, folder)
    assert LONGEST in lorakit.adapter_names(fresh)


@pytest.mark.parametrize("name", [TOO_LONG, "x" * 300])
def test_a_name_too_long_for_a_folder_is_refused_before_anything_changes(tmp_path, name):
    net = two_adapters()
    folder = lorakit.save(net, tmp_path / "saved", names="a")
    before, names = snapshot(net)
    refusals = [lambda: lorakit.attach(net, lorakit.AdapterConfig(r=2), name=name),
                lambda: lorakit.combine(net, {"a": 0.5, "b": 0.5}, name=name, how="cat"),
                lambda: lorakit.load(net, folder, name=name)]
    for refuse in refusals:
        with pytest.raises(ValueError, match=r"255 bytes") as err:
            refuse()
        assert len(str(err.value).splitlines()) == 1 and "Errno" not in str(err.value)
        after, names_after = snapshot(net)
        assert names_after == names and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
