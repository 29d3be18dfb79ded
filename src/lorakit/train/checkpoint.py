"""Atomic training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder ``ckpt-<step>/`` holds the adapter (lorakit format), the optimiser and scheduler state, the
RNG states and the trainer's position, so a resumed run continues bit-for-bit where the interrupted one stopped.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io import _atomic_folder

TENSOR_MARK = "__tensor__"


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
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
        adapter_writer(tmp / "adapter")

    _atomic_folder(folder, write)
    return folder


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Read the nested state written by :func:`write_checkpoint` (the adapter is read by the caller)."""
    folder = Path(folder)
    if not (folder / "state.json").exists():
        raise FileNotFoundError(f"{folder} is not a lorakit checkpoint (no state.json); point --resume at a "
                                "ckpt-<step> folder or at the run's output folder")
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    return {name: unflatten_state(value, tensors) for name, value in meta.items()}


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


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
