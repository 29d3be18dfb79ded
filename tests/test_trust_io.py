"""Issue 11, save/load safety: saves never delete what lorakit did not write and are atomic at every step (faults
injected into every write primitive in turn), loads refuse corrupt or invalid folders before changing the model and
roll back completely, adapter names that break the key scheme are refused, and restore() never corrupts a merged base.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
import lorakit.io as lkio
import lorakit.io.loader as lkload
import lorakit.io.lorakit_format as lkformat
import lorakit.io.peft as lkpeft
from lorakit import AdapterConfig, AdapterLoadError

X = torch.randn(5, 6, generator=torch.Generator().manual_seed(7))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def randomise(model: nn.Module, seed: int) -> None:
    """Non-zero values in every adapter tensor (so each adapter visibly changes the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.model.adapted_layers(model):
            for p in layer.adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def adapted(seed: int = 1, names=("default",)) -> nn.Module:
    net = mlp()
    for i, name in enumerate(names):
        lorakit.attach(net, AdapterConfig(r=2, targets=["0", "2"] if i == 0 else ["2"]), name=name)
    randomise(net, seed)
    return net


def loaded_outputs(folder) -> torch.Tensor:
    fresh = mlp()
    lorakit.load(fresh, folder)
    with torch.no_grad():
        return fresh(X)


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (hidden ones too): file -> bytes, folder -> None."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def model_state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            lorakit.adapter_names(model), lorakit.active_adapters(model),
            [type(m).__name__ for m in model.modules()])


def same_model_state(a, b) -> bool:
    sa, sb = a[0], b[0]
    return (sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)) and a[1:] == b[1:]


def make_run_folder(root: Path) -> Path:
    """A training run folder holding files lorakit's save did not write."""
    run = root / "run"
    (run / "ckpt-10").mkdir(parents=True)
    (run / "ckpt-10" / "state.json").write_text('{"step": 10}')
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "README.md").write_text("# my notes\n")
    (run / ".keep").write_text("")
    (run / ".run.tmp-notmine").mkdir()  # hidden, but not a name lorakit uses: must survive
    return run


OWN = {lkio.CONFIG_FILE, lkio.WEIGHTS_FILE, lkpeft.PEFT_CONFIG, lkpeft.PEFT_WEIGHTS}


def others(snapshot: dict[str, bytes | None]) -> dict[str, bytes | None]:
    """The entries of a folder tree that lorakit's save does not write."""
    return {k: v for k, v in snapshot.items() if Path(k).name not in OWN and Path(k).name != "extra"}


# ----------------------------------------------------------------------------------------------- item 1: data loss
@pytest.mark.parametrize("fmt", ["lorakit", "peft"])
def test_save_into_a_run_folder_keeps_every_other_file(tmp_path, fmt):
    run = make_run_folder(tmp_path)
    before = tree(run)
    net = adapted(seed=1)
    lorakit.save(net, run, format=fmt)
    after = tree(run)
    assert {k: after[k] for k in before} == before  # nothing lorakit did not write was touched or removed
    assert torch.equal(loaded_outputs(run), outputs(net))
    # overwrite: still only lorakit's files change
    randomise(net, 2)
    lorakit.save(net, run, format=fmt)
    again = tree(run)
    assert {k: again[k] for k in before} == before and set(again) == set(after)
    assert torch.equal(loaded_outputs(run), outputs(net))


def test_save_to_a_path_that_is_a_file_refuses_and_the_file_survives(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    net = adapted()
    for fmt in ("lorakit", "peft"):
        with pytest.raises(ValueError, match="notes.txt"):
            lorakit.save(net, notes, format=fmt)
        assert notes.is_file() and notes.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_save_refuses_a_subpath_blocked_by_a_file(tmp_path):
    """PEFT's multi-adapter layout needs a subfolder per adapter; a file in its place is refused, nothing written."""
    net = adapted(names=("default", "other"))
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "other").write_text("mine")
    before = tree(folder)
    with pytest.raises(ValueError, match="other"):
        lorakit.save(net, folder, format="peft")
    assert tree(folder) == before


def test_saved_folders_and_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        net = adapted(names=("default", "other"))
        new = lorakit.save(net, tmp_path / "new")
        existing = tmp_path / "existing"
        existing.mkdir()
        lorakit.save(net, existing)
        peft = lorakit.save(net, tmp_path / "peft", format="peft")
        text = tmp_path / "report.md"
        lkio.atomic_write_text(text, "hello")
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o755
    assert stat.S_IMODE((peft / "other").stat().st_mode) == 0o755
    for f in (new / lkio.CONFIG_FILE, new / lkio.WEIGHTS_FILE, existing / lkio.CONFIG_FILE,
              existing / lkio.WEIGHTS_FILE, peft / "other" / lkpeft.PEFT_WEIGHTS, text):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_lorakit_and_peft_adapters_are_not_mixed_in_one_folder(tmp_path):
    """A lorakit save next to a PEFT adapter (or the reverse) would leave two adapters in one folder, and load would
    silently pick one: refused, naming the other format's file."""
    net = adapted()
    folder = lorakit.save(net, tmp_path / "a", format="peft")
    before = tree(folder)
    with pytest.raises(ValueError, match="adapter_config.json"):
        lorakit.save(net, folder)
    assert tree(folder) == before
    folder2 = lorakit.save(net, tmp_path / "b")
    before2 = tree(folder2)
    with pytest.raises(ValueError, match="lorakit_config.json"):
        lorakit.save(net, folder2, format="peft")
    assert tree(folder2) == before2


def test_stale_peft_adapter_subfolder_is_refused_not_silently_kept(tmp_path):
    net = adapted(names=("default", "other"))
    folder = lorakit.save(net, tmp_path / "p", format="peft")
    lorakit.delete(net, "other")
    before = tree(folder)
    with pytest.raises(ValueError, match="other"):
        lorakit.save(net, folder, format="peft")  # would leave an old 'other' that load() picks up
    assert tree(folder) == before


# ------------------------------------------------------------------------------------ item 2: fault injection
class Injector:
    """Wraps the write primitives; counts their calls during a save and makes the k-th call of one of them fail."""

    PRIMS = ("os.open", "os.write", "os.fsync", "os.replace", "os.rename", "os.link", "os.mkdir", "os.chmod",
             "os.unlink", "save_file")

    def __init__(self, monkeypatch):
        self.counts: Counter = Counter()
        self.fail_at: tuple[str, int] | None = None
        self.armed = False
        for prim in self.PRIMS:
            if prim == "save_file":
                for mod in (lkformat, lkpeft):
                    monkeypatch.setattr(mod, "save_file", self._wrap(prim, getattr(mod, "save_file")))
            else:
                monkeypatch.setattr(os, prim[3:], self._wrap(prim, getattr(os, prim[3:])))

    def _wrap(self, prim, real):
        def wrapper(*args, **kwargs):
            if self.armed:
                self.counts[prim] += 1
                if self.fail_at == (prim, self.counts[prim]):
                    raise OSError(errno.EIO, f"injected failure in {prim} #{self.counts[prim]}")
            return real(*args, **kwargs)

        return wrapper

    def run(self, fn, fail_at=None):
        self.counts, self.fail_at, self.armed = Counter(), fail_at, True
        try:
            return fn()
        finally:
            self.armed = False


def _scenario(kind: str, tmp_path: Path):
    """(folder, save function for the new adapter, outputs of the old adapter or None, outputs of the new one)."""
    if kind == "overwrite":
        folder = make_run_folder(tmp_path)
        old = adapted(seed=1)
        lorakit.save(old, folder)
        new = adapted(seed=2)
        return folder, lambda: lorakit.save(new, folder), outputs(old), outputs(new)
    if kind == "new-folder":
        (tmp_path / "fresh").mkdir()
        new = adapted(seed=2)
        return tmp_path / "fresh" / "ad", lambda: lorakit.save(new, tmp_path / "fresh" / "ad"), None, outputs(new)
    if kind == "into-run-folder":
        folder = make_run_folder(tmp_path)
        new = adapted(seed=2)
        return folder, lambda: lorakit.save(new, folder), None, outputs(new)
    if kind == "peft-overwrite":
        folder = make_run_folder(tmp_path)
        old = adapted(seed=1, names=("default", "extra"))
        lorakit.save(old, folder, format="peft")
        new = adapted(seed=2, names=("default", "extra"))
        for m in (old, new):
            lorakit.set_active(m, ["default", "extra"])
        return folder, lambda: lorakit.save(new, folder, format="peft"), outputs(old), outputs(new)
    raise AssertionError(kind)


def _load_all(folder: Path) -> torch.Tensor:
    fresh = mlp()
    lorakit.load(fresh, folder)
    lorakit.set_active(fresh, lorakit.adapter_names(fresh))
    with torch.no_grad():
        return fresh(X)


@pytest.mark.parametrize("kind", ["overwrite", "new-folder", "into-run-folder", "peft-overwrite"])
def test_a_failure_at_every_step_of_a_save_leaves_the_previous_state(tmp_path, monkeypatch, kind):
    folder, do_save, old_out, new_out = _scenario(kind, tmp_path)
    parent = folder.parent
    before = tree(parent)
    inj = Injector(monkeypatch)
    inj.run(do_save)
    steps = [(prim, k) for prim in Injector.PRIMS for k in range(1, inj.counts[prim] + 1)]
    assert inj.counts["os.replace"] + inj.counts["os.rename"] >= 1 and inj.counts["save_file"] >= 1
    failed: Counter = Counter()
    for step in steps:
        # back to the state before the save
        monkeypatch.undo()
        shutil.rmtree(parent)
        parent.mkdir(parents=True)
        for rel, data in sorted(before.items()):
            if data is None:
                (parent / rel).mkdir(parents=True, exist_ok=True)
            else:
                (parent / rel).parent.mkdir(parents=True, exist_ok=True)
                (parent / rel).write_bytes(data)
        inj = Injector(monkeypatch)
        try:
            inj.run(do_save, fail_at=step)
        except OSError as err:
            assert "injected" in str(err), step
            failed[step[0]] += 1
            after = tree(parent)
            assert after == before, f"{step}: the folder changed: {sorted(set(after) ^ set(before))}"
            if old_out is None:
                assert not (folder / lkio.CONFIG_FILE).exists() and not (folder / lkio.WEIGHTS_FILE).exists()
            else:
                monkeypatch.undo()
                got = _load_all(folder) if kind == "peft-overwrite" else loaded_outputs(folder)
                assert torch.equal(got, old_out), step
        else:  # the failing step had a fallback (e.g. a copy instead of a hard link): the save must be complete
            monkeypatch.undo()
            after = tree(parent)
            assert {k: after[k] for k in others(before)} == others(before), step
            target = os.path.relpath(folder, parent)
            assert all(k == target or Path(k).name in OWN or Path(k).name == "extra"
                       for k in set(after) - set(before)), (step, sorted(set(after) - set(before)))
            got = _load_all(folder) if kind == "peft-overwrite" else loaded_outputs(folder)
            assert torch.equal(got, new_out), step
    # the injection really hit the main steps
    assert failed["save_file"] >= 1 and failed["os.replace"] + failed["os.rename"] >= 1 and failed["os.fsync"] >= 1


def test_no_temporaries_left_after_a_failed_serialisation(tmp_path, monkeypatch):
    """A tensor safetensors refuses (shared memory is fine, but a failure in save_file) leaves no hidden folder."""
    net = adapted()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lkformat, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        lorakit.save(net, tmp_path / "ad")
    assert list(tmp_path.iterdir()) == []


def _die_at_rename(do_save, kill_at: int) -> None:
    """Run ``do_save`` in a forked child that dies at its ``kill_at``-th ``os.replace`` (``os._exit``: no cleanup,
    no rollback, as after SIGKILL); fails if the save finished first."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            real, calls = os.replace, [0]

            def replace(*args, **kwargs):
                calls[0] += 1
                if calls[0] == kill_at:
                    os._exit(7)
                return real(*args, **kwargs)

            os.replace = replace
            do_save()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7, "the save did not reach that rename"


@pytest.mark.parametrize("names, renames", [(("default",), 2), (("default", "extra"), 4)], ids=["one", "two"])
def test_a_peft_save_killed_between_its_renames_is_refused_not_mixed(tmp_path, names, renames):
    """PEFT's config has no room for lorakit's save id, so the folder's own record of the save tells: a PEFT folder
    whose files come partly from a save killed between its renames (new weights, old config with another alpha;
    or, with several adapters, some from each save) is refused as interrupted, never loaded mixed. Killed before
    the first rename, the previous adapters load exactly; the next save repairs the folder."""
    def model(seed, alpha):
        net = mlp()
        for i, name in enumerate(names):
            lorakit.attach(net, AdapterConfig(r=2, alpha=alpha, targets=["0", "2"] if i == 0 else ["2"]), name=name)
        randomise(net, seed)
        lorakit.set_active(net, list(names))
        return net

    old, new = model(1, alpha=4), model(2, alpha=16)
    for kill_at in range(1, renames + 1):
        folder = make_run_folder(tmp_path / str(kill_at))
        lorakit.save(old, folder, format="peft")
        _die_at_rename(lambda: lorakit.save(new, folder, format="peft"), kill_at)
        if kill_at == 1:
            assert torch.equal(_load_all(folder), outputs(old))
        else:
            fresh = mlp()
            before = model_state(fresh)
            with pytest.raises(AdapterLoadError, match=r"(?s)interrupted.*Save the adapter again"):
                lorakit.load(fresh, folder)
            assert same_model_state(before, model_state(fresh))
            # the dead save's temporary as if another host's (a save from here cannot tell it is dead): it stays
            dead = next(p for p in folder.iterdir() if "lorakit-tmp" in p.name)
            dead.rename(folder / re.sub(r"lorakit-tmp-[A-Za-z0-9_]+-", "lorakit-tmp-elsewhere-", dead.name))
            with pytest.raises(AdapterLoadError, match="interrupted"):
                lorakit.load(mlp(), folder)
        lorakit.save(new, folder, format="peft")  # the next save repairs it and removes the dead save's temporaries
        assert torch.equal(_load_all(folder), outputs(new))  # a leftover temporary no longer reads as interrupted
        assert not [p for p in folder.iterdir() if "lorakit" in p.name and "elsewhere" not in p.name]


# --------------------------------------------------------------------------- consistency of the two files of a save
def test_weights_and_config_of_different_saves_are_detected(tmp_path):
    """A crash between the two renames leaves new weights next to the old config: load refuses it clearly."""
    net = adapted(seed=1)
    folder = lorakit.save(net, tmp_path / "ad")
    old_config = (folder / lkio.CONFIG_FILE).read_bytes()
    randomise(net, 2)
    lorakit.save(net, folder)
    (folder / lkio.CONFIG_FILE).write_bytes(old_config)
    fresh = mlp()
    before = model_state(fresh)
    with pytest.raises(AdapterLoadError, match="interrupted") as err:
        lorakit.load(fresh, folder)
    assert str(folder) in str(err.value)
    assert same_model_state(before, model_state(fresh))


# ------------------------------------------------------------------------------------------ item 5: adapter names
@pytest.mark.parametrize("bad", ["a|b", "|", "x\n", "keys", "training", "a\\b", "tab\tname"])
def test_names_that_break_the_key_scheme_are_refused_everywhere(tmp_path, bad):
    net = adapted()
    before = model_state(net)
    with pytest.raises(ValueError, match="adapter name"):
        lorakit.attach(net, AdapterConfig(r=2, targets=["0"]), name=bad)
    assert same_model_state(before, model_state(net))
    lorakit.attach(net, AdapterConfig(r=2, targets=["0"]), name="b")
    before = model_state(net)
    with pytest.raises(ValueError, match="adapter name"):
        lorakit.combine(net, {"default": 0.5, "b": 0.5}, name=bad)
    assert same_model_state(before, model_state(net))
    folder = lorakit.save(adapted(), tmp_path / "ad")
    fresh = mlp()
    before = model_state(fresh)
    with pytest.raises(ValueError, match="adapter name"):
        lorakit.load(fresh, folder, name=bad)
    assert same_model_state(before, model_state(fresh))


@pytest.mark.parametrize("fmt", ["lorakit", "peft"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_refuses_non_finite_adapters_and_writes_nothing(tmp_path, fmt, value):
    # lorakit never writes what it refuses to load: a diverged adapter is refused by name before any file changes
    model = adapted()
    folder = lorakit.save(model, tmp_path / "a", format=fmt)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = value
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\), so nothing was written"):
        lorakit.save(model, folder, format=fmt)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(ValueError, match="non-finite"):
        lorakit.save(model, tmp_path / "new", format=fmt)
    assert not (tmp_path / "new").exists()


def test_a_file_with_a_bad_saved_name_is_refused(tmp_path):
    folder = lorakit.save(adapted(), tmp_path / "ad")
    meta = json.loads((folder / lkio.CONFIG_FILE).read_text())
    meta["adapters"]["a|b"] = meta["adapters"].pop("default")
    (folder / lkio.CONFIG_FILE).write_text(json.dumps(meta))
    fresh = mlp()
    before = model_state(fresh)
    with pytest.raises(AdapterLoadError, match=r"a\|b"):
        lorakit.load(fresh, folder)
    assert same_model_state(before, model_state(fresh))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(max_size=12),
                      st.text(alphabet="ab|./ \t\\-_é中\x00", max_size=6),
                      st.sampled_from(["keys", "default", "training", "über", "a b", "a.b", "x|y", " a", ""])))
def test_any_adapter_name_round_trips_or_is_refused_before_any_change(tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("names") / "ad"
    net = mlp()
    before = model_state(net)
    try:
        lorakit.attach(net, AdapterConfig(r=2, targets=["0", "2"]), name=name)
    except ValueError:
        assert same_model_state(before, model_state(net))
        return
    randomise(net, 3)
    lorakit.save(net, folder)
    fresh = mlp()
    lorakit.load(fresh, folder)
    assert lorakit.adapter_names(fresh) == [name]
    assert torch.equal(outputs(fresh), outputs(net))
    peft = lorakit.save(net, folder.parent / "peft", format="peft")
    again = mlp()
    lorakit.load(again, peft, name=name)
    assert torch.allclose(outputs(again), outputs(net), atol=1e-6)


# ------------------------------------------------------------------------------ item 9: restore into a merged model
def test_restore_into_a_merged_adapter_never_corrupts_the_base(tmp_path):
    net = adapted(seed=1)
    folder = lorakit.save(net, tmp_path / "ad")
    randomise(net, 2)  # the in-memory adapter now differs from the saved one
    ref = mlp()
    lorakit.attach(ref, AdapterConfig(r=2, targets=["0", "2"]))
    randomise(ref, 2)
    lorakit.merge(ref)
    lorakit.unmerge(ref)
    expected_base = lorakit.unload(ref, merge=False).state_dict()  # merge -> unmerge alone
    lorakit.merge(net)
    try:
        lkio.restore(net, folder)
    except ValueError as err:
        assert "merged" in str(err) and "unmerge" in str(err)
    lorakit.unmerge(net)
    base = lorakit.unload(net, merge=False).state_dict()
    assert all(torch.equal(base[k], expected_base[k]) for k in expected_base)


# ---------------------------------------------------------------------------- items 11, 12, 17, 18: corrupt files
def _corrupt_weights(folder: Path, how: str) -> None:
    wfile = folder / lkio.WEIGHTS_FILE
    raw = wfile.read_bytes()
    if how == "truncated":
        wfile.write_bytes(raw[: len(raw) - 7])
    elif how == "flipped-header":
        b = bytearray(raw)
        b[12] ^= 0xFF
        wfile.write_bytes(bytes(b))
    elif how == "empty":
        wfile.write_bytes(b"")
    else:
        # rewrite one tensor keeping lorakit's metadata (so the pairing check is not what catches it)
        from safetensors import safe_open

        with safe_open(str(wfile), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(wfile))
        key = sorted(k for k in tensors if k.endswith("|B"))[0]
        t = tensors[key].clone()
        if how == "int64":
            t = t.round().to(torch.int64)
        else:
            t.view(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[how]
        tensors[key] = t
        save_file(tensors, str(wfile), metadata=meta)


@pytest.mark.parametrize("how", ["truncated", "flipped-header", "empty", "int64", "nan", "inf", "-inf"])
def test_corrupt_weights_are_refused_naming_the_file_and_the_model_is_unchanged(tmp_path, how):
    net = adapted(names=("pre",))
    folder = lorakit.save(adapted(names=("default", "second")), tmp_path / "ad")
    _corrupt_weights(folder, how)
    before = model_state(net)
    with pytest.raises(AdapterLoadError) as err:
        lorakit.load(net, folder, trainable=True)
    msg = str(err.value)
    assert lkio.WEIGHTS_FILE in msg
    if how in ("truncated", "flipped-header", "empty"):
        assert "corrupt" in msg or "incomplete" in msg
    else:
        assert "|B" in msg and ("int64" in msg if how == "int64" else "finite" in msg)
    assert same_model_state(before, model_state(net))
    with pytest.raises(AdapterLoadError):  # --resume's path too
        lkio.restore(net, folder)
    assert same_model_state(before, model_state(net))


def _edit_config(folder: Path, edit) -> None:
    cfg = folder / lkio.CONFIG_FILE
    meta = json.loads(cfg.read_text())
    cfg.write_text(json.dumps(edit(meta)))


def _set(path, value):
    def edit(meta):
        d = meta
        for k in path[:-1]:
            d = d[k]
        if value is KeyError:
            del d[path[-1]]
        else:
            d[path[-1]] = value
        return meta

    return edit


CONFIG_EDITS = {
    "json-list": (lambda meta: [meta], "JSON object"),
    "json-string": (lambda meta: "lorakit", "JSON object"),
    "version-999": (_set(["version"], 999), "newer lorakit"),
    "version-str": (_set(["version"], "1"), "version"),
    "version-missing": (_set(["version"], KeyError), "version"),
    "adapters-list": (_set(["adapters"], []), "adapters"),
    "adapters-empty": (_set(["adapters"], {}), "adapters"),
    "entry-str": (_set(["adapters", "second"], "x"), "second"),
    "config-list": (_set(["adapters", "second", "config"], [1]), "config"),
    "config-missing": (_set(["adapters", "second", "config"], KeyError), "config"),
    "r-negative": (_set(["adapters", "second", "config", "r"], -1), "r=-1"),
    "bad-method": (_set(["adapters", "second", "config", "method"], "lorra"), "method"),
    "unknown-field": (_set(["adapters", "second", "config", "rr"], 3), "rr"),
    "layers-str": (_set(["adapters", "second", "layers"], "2"), "layers"),
    "layers-ints": (_set(["adapters", "second", "layers"], [2]), "layers"),
    "layers-unknown": (_set(["adapters", "second", "layers"], ["9"]), "9"),
    "mts-str": (_set(["adapters", "second", "modules_to_save"], "2"), "modules_to_save"),
    "extra-list": (_set(["adapters", "second", "extra"], [1]), "extra"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_invalid_config_values_are_refused_before_anything_changes(tmp_path, case):
    edit, fragment = CONFIG_EDITS[case]
    folder = lorakit.save(adapted(names=("default", "second")), tmp_path / "ad")
    _edit_config(folder, edit)
    net = adapted(names=("pre",))
    net[0].weight.requires_grad_(True)  # a user's own choice, which a failed load must not change
    before = model_state(net)
    with pytest.raises(AdapterLoadError) as err:
        lorakit.load(net, folder, trainable=True)
    msg = str(err.value)
    assert lkio.CONFIG_FILE in msg and fragment in msg, msg
    assert same_model_state(before, model_state(net))


def test_second_broken_adapter_rolls_back_everything_the_first_changed(tmp_path):
    saved = adapted(names=("default", "second"))
    folder = lorakit.save(saved, tmp_path / "ad")
    tensors = load_file(str(folder / lkio.WEIGHTS_FILE))
    key = next(k for k in tensors if k.startswith("second|") and k.endswith("|A"))
    tensors[key] = torch.zeros(2, 5)  # wrong shape, only found once the second adapter is planned
    save_file(tensors, str(folder / lkio.WEIGHTS_FILE), metadata={"format": "lorakit"})
    for trainable in (False, True):
        net = adapted(names=("pre",))
        lorakit.set_trainable(net, "pre", True)
        net[2].bias.requires_grad_(True)
        before = model_state(net)
        with pytest.raises(AdapterLoadError, match="shape"):
            lorakit.load(net, folder, trainable=trainable)
        assert same_model_state(before, model_state(net))


def test_valid_folders_still_load_and_old_files_without_save_id_too(tmp_path):
    net = adapted(names=("default", "second"))
    lorakit.set_active(net, ["default", "second"])
    folder = lorakit.save(net, tmp_path / "ad")
    meta = json.loads((folder / lkio.CONFIG_FILE).read_text())
    assert meta["version"] == lkio.FORMAT_VERSION
    # a folder written by an older lorakit: no save id in either file
    meta.pop("save_id", None)
    (folder / lkio.CONFIG_FILE).write_text(json.dumps(meta))
    tensors = load_file(str(folder / lkio.WEIGHTS_FILE))
    save_file(tensors, str(folder / lkio.WEIGHTS_FILE), metadata={"format": "lorakit"})
    fresh = mlp()
    lorakit.load(fresh, folder)
    assert torch.equal(outputs(fresh), outputs(net))


@pytest.mark.parametrize("how", ["truncated", "nan"])
def test_corrupt_peft_weights_are_refused_naming_the_file(tmp_path, how):
    folder = lorakit.save(adapted(), tmp_path / "peft", format="peft")
    wfile = folder / lkpeft.PEFT_WEIGHTS
    if how == "truncated":
        wfile.write_bytes(wfile.read_bytes()[:-9])
    else:
        tensors = load_file(str(wfile))
        key = sorted(tensors)[0]
        tensors[key][0, 0] = float("nan")
        save_file(tensors, str(wfile), metadata={"format": "pt"})
    net = mlp()
    before = model_state(net)
    with pytest.raises(AdapterLoadError) as err:
        lorakit.load(net, folder)
    assert lkpeft.PEFT_WEIGHTS in str(err.value) and ("corrupt" in str(err.value) or "finite" in str(err.value))
    assert same_model_state(before, model_state(net))


def test_a_failure_after_the_first_adapter_is_committed_rolls_back_exactly(tmp_path, monkeypatch):
    """Injected failure while committing the second adapter of a folder (after the first, a PiSSA adapter that
    rewrites base weights, is in): base weights, trainable flags, adapters and the active list are exactly back."""
    saved = mlp()
    lorakit.attach(saved, AdapterConfig(r=2, targets=["0", "2"], init="pissa"), name="first")
    lorakit.attach(saved, AdapterConfig(r=2, targets=["2"]), name="second")
    randomise(saved, 4)
    folder = lorakit.save(saved, tmp_path / "ad")
    net = adapted(names=("pre",))
    lorakit.set_trainable(net, "pre", True)
    before = model_state(net)
    real, calls = lkload.commit_plan, [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a load
        return real(*args, **kwargs)

    monkeypatch.setattr(lkload, "commit_plan", flaky)
    with pytest.raises(KeyboardInterrupt):
        lorakit.load(net, folder, trainable=True)
    assert calls[0] == 2
    assert same_model_state(before, model_state(net))
