"""Folder primitives shared by both adapter formats: atomic writes that never touch other files, lorakit's
temporaries (and removing those a killed process left), and reading safetensors files with the corrupt/NaN checks.

Nothing here knows a format's layout; :mod:`lorakit.io.lorakit_format` and :mod:`lorakit.io.peft` build on it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open


#: separates the parts of a tensor's key in lorakit's layout: "<adapter>|<kind>|<path>|<tensor>"
SEP = "|"


class AdapterLoadError(ValueError):
    """An adapter folder does not fit the model (missing/unexpected keys, wrong shapes, bad config)."""


# ---------------------------------------------------------------------------------------------------------------
# atomic writes that never delete what lorakit did not write
# ---------------------------------------------------------------------------------------------------------------
# Every temporary lorakit creates is named ".<prefix>lorakit-tmp-<host>-<pid>-<hex>", so a later save can tell its own
# leftovers (from a process that was killed) from anybody else's files and remove only those.
_TMP_TAG = "lorakit-tmp"
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
_TMP_RE = re.compile(r"\.(?P<prefix>.*)" + _TMP_TAG + r"-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _tmp_name(prefix: str = "") -> str:
    return f".{prefix}{_TMP_TAG}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def _clean_stale(directory: Path, prefix: str | None) -> list[Path]:
    """Remove temporaries named by lorakit for ``prefix`` (None: any) in ``directory`` whose process (on this host)
    is gone; returns what was removed."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TMP_RE.fullmatch(entry.name)
        if (m and (prefix is None or m["prefix"] == prefix) and m["host"] == _HOST
                and not _pid_alive(int(m["pid"]))):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed lorakit writes (of processes on this host that no longer run) left in
    ``directory``; nothing else is touched. Returns the removed paths.

    Example:
        >>> import tempfile
        >>> remove_stale_temporaries(tempfile.mkdtemp())
        []
    """
    return _clean_stale(Path(directory), None)


def _remove_tree(path: Path) -> None:
    """Remove one of our temporaries; tried twice (a transient error must not leave it behind). A temporary that
    still cannot be removed is removed by a later save once this process has ended."""
    for _ in range(2):
        if not os.path.lexists(path):
            return
        shutil.rmtree(path, ignore_errors=True)


def _make_dir(path: Path) -> None:
    os.mkdir(path, 0o777)  # mode 0777 & ~umask, like any other writer (mkdtemp would give 0700)


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist) holding ``data``, with the umask's permissions.

    Example:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "blob"
        >>> write_new_file(file, b"abc")
        >>> file.read_bytes()
        b'abc'
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable where the platform allows it (best effort: not every OS/filesystem can)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` (a fresh temporary folder), first giving each the permissions a new file
    gets here: some writers (safetensors' ``save_file``) create files 0600 whatever the umask."""
    probe = root / _tmp_name("probe.")
    write_new_file(probe, b"")
    mode = stat.S_IMODE(os.stat(probe).st_mode)  # 0666 & ~umask (and default ACLs): what any writer would give
    os.unlink(probe)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath) / name
            if stat.S_IMODE(os.stat(file).st_mode) != mode:
                os.chmod(file, mode)
            _fsync_file(file)
        _fsync_dir(Path(dirpath))


def _plan_commit(src: Path, dst: Path) -> list[tuple[str, Path, Path]]:
    """Actions putting every file under ``src`` at the same place under ``dst``: ("file", s, d) replaces one file,
    ("dir", s, d) moves a whole folder that does not exist yet. Raises ValueError, before any change, if a path
    lorakit must write is taken by something of the other kind. Weights before configs (``*.json`` last), so a
    config never describes weights that are not there yet."""
    actions: list[tuple[str, Path, Path]] = []

    def walk(s: Path, d: Path) -> None:
        for child in sorted(s.iterdir()):
            target = d / child.name
            if child.is_dir():
                if not os.path.lexists(target):
                    actions.append(("dir", child, target))
                elif target.is_dir():
                    walk(child, target)
                else:
                    raise ValueError(f"cannot save: {str(target)!r} exists and is not a folder, but lorakit needs a "
                                     f"folder there; move or rename it (nothing was written)")
            else:
                if target.is_dir():
                    raise ValueError(f"cannot save: {str(target)!r} is a folder, but lorakit writes a file there; "
                                     f"move or rename it (nothing was written)")
                actions.append(("file", child, target))

    walk(src, dst)
    actions.sort(key=lambda a: (a[2].suffix == ".json", -len(a[2].parts), str(a[2])))
    return actions


def _commit(src: Path, dst: Path, work: Path) -> None:
    """Move what ``src`` holds into the existing folder ``dst``, one atomic rename per file (other files untouched).

    Every file about to be replaced is first hard-linked (or copied) into ``work``, so if a rename fails part-way
    the files already replaced are put back and ``dst`` is exactly as before; at no instant is a replaced file
    missing from ``dst``."""
    actions = _plan_commit(src, dst)
    backups: dict[Path, Path] = {}
    keep = work / "previous"
    for i, (kind, _, target) in enumerate(actions):
        if kind == "file" and os.path.lexists(target):
            if not backups:
                _make_dir(keep)
            backup = keep / str(i)
            try:
                os.link(target, backup)
            except OSError:  # no hard links here (some filesystems): a copy does as well
                shutil.copy2(target, backup)
            backups[target] = backup
    # The plan, before the first rename: each target with the identity (device, inode, ...: a rename keeps it) of
    # the file or folder about to be put there. If this process dies between two renames, a reader can tell which
    # targets already hold this save's files and which still wait in work/new, and refuse the mixed folder; once
    # a later save has replaced them, none holds this save's files any more (see interrupted_save).
    plan = work / COMMIT_PLAN
    targets = [[os.path.relpath(t, dst), *_identity(s)] for _, s, t in actions]
    write_new_file(plan, json.dumps({"targets": targets}).encode("utf-8"))
    _fsync_file(plan)
    done: list[tuple[str, Path, Path]] = []
    try:
        for kind, source, target in actions:
            if kind == "dir":
                os.rename(source, target)
            else:
                os.replace(source, target)
            done.append((kind, source, target))
    except BaseException as err:
        try:
            for kind, source, target in reversed(done):
                if kind == "dir":
                    os.rename(target, source)
                elif target in backups:
                    os.replace(backups[target], target)
                else:
                    os.unlink(target)
            with contextlib.suppress(OSError):  # all back: a temporary outliving this must not read as mixed
                os.unlink(plan)
        except OSError as again:
            work_kept = work.with_name(work.name.replace(_TMP_TAG, "lorakit-failed-save"))
            with contextlib.suppress(OSError):
                os.rename(work, work_kept)
            raise OSError(f"saving into {str(dst)!r} failed ({err}) and putting the previous files back failed too "
                          f"({again}); the previous versions of the replaced files are kept in {str(work_kept)!r}"
                          ) from err
        raise
    for d in {t.parent for _, _, t in actions}:
        _fsync_dir(d)


#: the file in a save's temporary folder listing the files its renames put in place, in order
COMMIT_PLAN = "commit.json"


def _identity(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """What tells one file from another at the same path across renames: device, inode (a rename keeps both; size
    and modification time too, and they tell a later file that got a freed inode number again apart)."""
    st = os.stat(path, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):  # a folder's size and times follow its entries (and, on some systems, its move)
        return st.st_dev, st.st_ino, 0, 0
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def interrupted_save(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` must not be loaded now, or None: a lorakit save into it (or into the folder holding it, PEFT's
    multi-adapter layout) stopped between the renames that put its files in place, killed or still running, so
    some of its files are the new save's and others the previous one's.

    Only a save into an existing folder replaces files one by one; its temporary folder records the plan first.

    Example:
        >>> import tempfile
        >>> interrupted_save(tempfile.mkdtemp()) is None
        True
    """
    folder = Path(folder)
    for root in (folder, folder.parent):
        try:
            entries = [e for e in os.scandir(root) if _TMP_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in entries:
            work = Path(entry.path)
            try:
                plan = json.loads((work / COMMIT_PLAN).read_text(encoding="utf-8"))["targets"]
                targets = {str(rel): tuple(int(v) for v in identity) for rel, *identity in plan}
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a commit (still writing, or a new folder): nothing in place was replaced yet
            ours = [t for t in targets if os.path.normpath(root / t).startswith(os.path.normpath(folder) + os.sep)]

            def holds_new(rel: str) -> bool:  # the target holds the very file (or folder) this save put there
                try:
                    return _identity(root / rel) == targets[rel]
                except OSError:
                    return False

            moved = [t for t in ours if holds_new(t)]
            waiting = [t for t in ours if os.path.lexists(work / "new" / t)]
            if moved and waiting:
                return (f"a save into {str(root)!r} was interrupted between its renames (the process was killed, or "
                        f"is still saving): {', '.join(moved)} come from the new save but {', '.join(waiting)} "
                        f"from the previous one, so the adapter would load mixed. Save the adapter again into this "
                        f"folder (that repairs it and removes {work.name}); the replaced files' previous versions "
                        f"are in {work / 'previous'} (numbered as the targets in its {COMMIT_PLAN})")
    return None


def atomic_folder(path: Path, write: Callable[[Path], None]) -> None:
    """Write lorakit's files for folder ``path`` with ``write(tmp_folder)``, then put them in place atomically.

    * ``path`` does not exist: ``tmp_folder`` (a hidden sibling) becomes ``path`` in one rename.
    * ``path`` is a folder: each file written is moved into it by its own atomic rename (weights before ``*.json``
      configs; new subfolders move whole); every other file in ``path`` stays as it is, and a failure part-way puts
      back the files already replaced.
    * ``path`` is anything else (a file): ValueError naming it; nothing is written.

    Files are fsynced before they are moved; temporaries are removed on success and on any error, and those left
    by a killed earlier save (named by lorakit, of a process that no longer runs) are removed too. Permissions
    follow the umask.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp()) / "out"
        >>> atomic_folder(folder, lambda tmp: (tmp / "a.txt").write_text("hi"))
        >>> (folder / "a.txt").read_text()
        'hi'
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise ValueError(f"cannot save to {str(path)!r}: it exists and is not a folder (lorakit saves a folder); "
                         f"choose another path — the file was left as it is")
    if path.is_dir():
        _clean_stale(path, "")
        work = path / _tmp_name()
        _make_dir(work)
        try:
            new = work / "new"
            _make_dir(new)
            write(new)
            _fsync_tree(new)
            _commit(new, path, work)
        finally:
            _remove_tree(work)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path.parent, path.name + ".")
    tmp = path.parent / _tmp_name(path.name + ".")
    _make_dir(tmp)
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _remove_tree(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, fsync, rename), with the umask's permissions.

    Example:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write_text(file, "done")
        >>> file.read_text()
        'done'
    """
    path = Path(path)
    _clean_stale(path.parent, path.name + ".")
    tmp = path.parent / _tmp_name(path.name + ".")
    try:
        write_new_file(tmp, text.encode("utf-8"))
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        for _ in range(2):  # twice: a transient error must not leave the temporary behind
            with contextlib.suppress(OSError):
                if os.path.lexists(tmp):
                    os.unlink(tmp)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank must call it in the same order).

    Example:
        >>> full_tensor(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return t.full_tensor() if hasattr(t, "full_tensor") else t



def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` holding NaN or inf, or None if all are finite.

    The one non-finite rule for what lorakit writes and reads (saves, checkpoints, loads).

    Example:
        >>> first_non_finite({"a": torch.zeros(2), "b": torch.tensor([1.0, float("nan")])})
        'b'
    """
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return key
    return None


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ValueError naming the tensor if ``tensors`` (about to be saved as ``what``) hold NaN/inf: lorakit
    never writes what it refuses to load.

    Example:
        >>> refuse_non_finite({"a": torch.ones(2)}, "adapter 'default'")
    """
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ValueError(f"{what}: tensor {bad!r} holds non-finite values (NaN or inf), so nothing was written "
                         f"(lorakit does not load such tensors). The training that produced it diverged: lower the "
                         f"learning rate or go back to an earlier checkpoint")


def read_safetensors(w_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; AdapterLoadError naming the file if it is corrupt or incomplete,
    or naming the tensor if it holds NaN/inf. Nothing is unpickled.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> file = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_file({"x": torch.zeros(2)}, str(file), metadata={"k": "v"})
        >>> tensors, meta = read_safetensors(file)
        >>> sorted(tensors), meta
        (['x'], {'k': 'v'})
    """
    try:
        with safe_open(str(w_file), framework="pt") as f:
            file_meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, RuntimeError, TypeError) as err:
        raise AdapterLoadError(f"{w_file}: the file is corrupt or incomplete and cannot be read as safetensors "
                               f"({err}); save the adapter again or restore the file from a copy") from None
    key = first_non_finite(tensors)
    if key is not None:
        raise AdapterLoadError(f"{w_file}: tensor {key!r} holds non-finite values (NaN or inf); lorakit does not "
                               f"load them (the run that saved it diverged: lower the learning rate, or use an "
                               f"earlier checkpoint)")
    return tensors, file_meta



def check_save_target(path: Path, writing: str, other_config: str, other: str) -> None:
    """Refuse to put one format's adapter next to the other's (``other_config`` is the file that marks the other
    format): load would silently pick one of them. ``writing``/``other`` name the two formats in the message.

    Example:
        >>> import tempfile
        >>> check_save_target(Path(tempfile.mkdtemp()), "lorakit", "adapter_config.json", "PEFT")
    """
    if path.is_dir() and (path / other_config).exists():
        raise ValueError(f"cannot save a {writing} adapter into {str(path)!r}: it already holds a {other} adapter "
                         f"({other_config}), and a folder with both would load only one of them. Save to another "
                         f"folder, or remove that adapter's files first")
