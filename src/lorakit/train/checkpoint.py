"""Atomic training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder ``ckpt-<step>/`` holds the adapter (lorakit format), the optimiser and scheduler state, the
RNG states and the trainer's position, so a resumed run continues bit-for-bit where the interrupted one stopped.

Reading is strict: :func:`read_checkpoint` reads every file of a checkpoint (state and adapter) and raises
:class:`CorruptCheckpointError` (a ValueError naming the folder and the problem) for a truncated, half-written or
hand-edited one; :func:`find_resumable` uses that to fall back from a corrupt newest checkpoint to the newest
intact one, leaving the bad one where it is.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_folder, read_folder, remove_stale_temporaries as remove_stale_in
from ..io.files import first_non_finite, refuse_non_finite

TENSOR_MARK = "__tensor__"
#: the parts every checkpoint has (written by the trainer)
REQUIRED_PARTS = ("trainer", "optimizer", "scheduler", "rng")


class CorruptCheckpointError(ValueError):
    """A checkpoint folder cannot be read back (truncated or missing file, invalid JSON, corrupt adapter)."""


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in a nested state (dicts/lists/numbers) by a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {TENSOR_MARK: key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, tensors, prefix), flatten_state(v, tensors, prefix)]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [flatten_state(v, tensors, prefix) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if TENSOR_MARK in obj:
            return tensors[obj[TENSOR_MARK]]
        if "__dict__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [unflatten_state(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    return obj


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(folder: Path, parts: dict[str, Any], adapter_writer) -> Path:
    """Write ``parts`` (nested state) and the adapter (via ``adapter_writer(path)``) into ``folder`` atomically."""

    def write(tmp: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        meta = {name: flatten_state(value, tensors) for name, value in parts.items()}
        refuse_non_finite(tensors, f"checkpoint {folder}")
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
        adapter_writer(tmp / "adapter")

    atomic_folder(folder, write)
    return folder


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Read the nested state written by :func:`write_checkpoint` and check that its adapter files read back.

    Raises :class:`CorruptCheckpointError` naming the folder and the problem if any file is truncated, missing or
    invalid (the adapter itself is loaded into the model by the caller).
    """
    folder = Path(folder)
    if not (folder / "state.json").exists():
        raise FileNotFoundError(f"{folder} is not a lorakit checkpoint (no state.json); point --resume at a "
                                "ckpt-<step> folder or at the run's output folder")
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        bad = first_non_finite(tensors)
        if bad is not None:  # reads back fine, but resuming from it would turn the adapter into NaN
            raise ValueError(f"state.safetensors: tensor {bad!r} holds non-finite values (NaN or inf)")
        meta = json.loads((folder / "state.json").read_text())
        if not isinstance(meta, dict) or any(part not in meta for part in REQUIRED_PARTS):
            raise ValueError(f"state.json lacks one of {', '.join(REQUIRED_PARTS)}")
        state = {name: unflatten_state(value, tensors) for name, value in meta.items()}
        if not isinstance(state["trainer"], dict) or not isinstance(state["trainer"].get("step"), int):
            raise ValueError("state.json has no trainer step")
        _read_adapter(folder / "adapter")
    except Exception as err:  # every way a file can be broken: report it as this checkpoint's problem
        raise CorruptCheckpointError(f"checkpoint {folder} is unreadable ({type(err).__name__}: "
                                     f"{_one_line(err)})") from None
    return state


def _read_adapter(folder: Path) -> None:
    """Read the checkpoint's adapter files completely (lorakit format or the trainer's trainable tensors)."""
    trainable = folder / "trainable.safetensors"
    if trainable.exists():
        bad = first_non_finite(load_file(str(trainable)))
        if bad is not None:
            raise ValueError(f"{trainable.name}: tensor {bad!r} holds non-finite values (NaN or inf)")
    else:
        read_folder(folder)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


class Resumable(NamedTuple):
    """The checkpoint a resume uses, its state, and the newer checkpoints skipped as corrupt (folder, reason)."""

    folder: Path
    state: dict[str, Any]
    skipped: list[tuple[Path, str]]


def find_resumable(path: Path) -> Resumable:
    """The checkpoint to resume from: ``path`` itself if it is a checkpoint, else the newest *intact* one in it.

    Corrupt newer checkpoints are skipped (reported in ``skipped``, never deleted). A corrupt checkpoint named
    explicitly, or a run folder without any intact checkpoint, raises :class:`CorruptCheckpointError`.
    """
    path = Path(path)
    if (path / "state.json").exists():  # an explicit checkpoint: use it or say why not
        try:
            return Resumable(path, read_checkpoint(path), [])
        except CorruptCheckpointError as err:
            others = [p.name for p in list_checkpoints(path.parent) if p != path]
            hint = (f"; resume from the run folder {str(path.parent)!r} to use the newest intact checkpoint "
                    f"(others there: {', '.join(others)})" if others else "")
            raise CorruptCheckpointError(f"{err}{hint}") from None
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint found in {str(path)!r} (expected ckpt-<step> folders)")
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(found):
        try:
            return Resumable(folder, read_checkpoint(folder), skipped)
        except CorruptCheckpointError as err:
            skipped.append((folder, str(err)))
    raise CorruptCheckpointError(f"no intact checkpoint in {str(path)!r}: " + "; ".join(r for _, r in skipped)
                                 + ". Start a new run without --resume (or into another output folder)")


def set_aside(folder: Path) -> Path:
    """Rename a (corrupt) checkpoint to ``<name>.corrupt[-k]`` so a new one can take its name; nothing is deleted."""
    folder = Path(folder)
    k, target = 1, folder.with_name(folder.name + ".corrupt")
    while target.exists():
        k += 1
        target = folder.with_name(f"{folder.name}.corrupt-{k}")
    folder.rename(target)
    return target


#: half-written temporary folders of lorakit 0.1.0's atomic writes for checkpoints and the final adapter (its
#: ".old-" folders are left alone: one may hold the only copy of an adapter)
_LEGACY_TMP = re.compile(r"\.(ckpt-\d+|adapter)\.tmp-[A-Za-z0-9_]+")


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Remove the temporaries a killed run left in its output folder (only lorakit's own names, of dead processes)."""
    removed = remove_stale_in(output_dir) if Path(output_dir).is_dir() else []
    for p in Path(output_dir).iterdir() if Path(output_dir).is_dir() else []:
        if p.is_dir() and not p.is_symlink() and _LEGACY_TMP.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    found = []
    for p in Path(output_dir).glob("ckpt-*"):
        m = re.fullmatch(r"ckpt-(\d+)", p.name)
        if m and (p / "state.json").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the newest checkpoint inside it."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    ckpts = list_checkpoints(path)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(output_dir: Path, keep_last: int, spare: Sequence[str] = ()) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; those named in ``spare`` (corrupt ones skipped by a
    resume) are neither counted nor deleted."""
    ours = [p for p in list_checkpoints(output_dir) if p.name not in set(spare)]
    for old in ours[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
