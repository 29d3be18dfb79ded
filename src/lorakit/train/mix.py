"""``lorakit mix``: mix saved adapter folders (lorakit's or PEFT's) on one base into a new plain-LoRA adapter folder.

The folders are loaded onto one copy of their base model, mixed by :func:`lorakit.combine` (any ``how``; the
task-vector rules of :mod:`lorakit.mixing` act on each adapter's exact weight change) and saved with
``lorakit_run.json`` (so ``lorakit predict``/``export`` find the base) and ``mix_report.json`` (each layer's rank and
relative error). The folder appears complete in one rename.

Example:
    >>> from lorakit.train.mix import parse_weights
    >>> parse_weights("0.7,0.3", 2)
    [0.7, 0.3]
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_folder, atomic_write_text, load, save
from ..mixing import TASK_VECTOR_RULES, check_mix_options, mix_report
from ..model import check_adapter_name, combine
from .job import RUN_FILE, detect_task, load_base, resolve_model_path

__all__ = ["parse_weights", "mix_folders"]


def parse_weights(text: str | None, count: int) -> list[float]:
    """``"0.7,0.3"`` as floats, one per adapter (None: 1.0 each); ValueError naming the problem otherwise."""
    if text is None:
        return [1.0] * count
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r} is invalid; give one number per adapter, comma-separated "
                         "(e.g. --weights 0.7,0.3)") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--weights {text!r} gives {len(weights)} value(s) for {count} adapter(s); give one finite "
                         "number per adapter, comma-separated")
    return weights


def _recorded_base(folder: Path) -> str | None:
    """The base model a folder says it belongs to: lorakit's run file, else PEFT's ``base_model_name_or_path``."""
    for file, key in ((RUN_FILE, "model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((folder / file).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return os.path.realpath(value) if os.path.isdir(value) else value
    return None


def _base_info(folder: Path, model: str | None) -> dict[str, Any]:
    """Base model folder, task and labels of an adapter folder: ``--model`` first, else its ``lorakit_run.json``."""
    info: dict[str, Any] = {}
    if (folder / RUN_FILE).exists():
        try:
            info = json.loads((folder / RUN_FILE).read_text())
        except ValueError as exc:
            raise ValueError(f"{folder / RUN_FILE} is not valid JSON ({exc}); fix it or pass --model") from None
        if not isinstance(info, dict):
            raise ValueError(f"{folder / RUN_FILE} must hold a JSON object; fix it or pass --model")
    if model is not None:
        info["model"] = resolve_model_path(model)
    if not isinstance(info.get("model"), str):
        raise ValueError(f"{folder} does not say which base model it belongs to; pass --model FOLDER")
    info.setdefault("task", detect_task(info["model"]))
    return info


def _names(folders: Sequence[Path]) -> list[str]:
    """One adapter name per folder: its folder name (made unique), or ``adapter<i>`` when that cannot be a name."""
    names: list[str] = []
    for i, folder in enumerate(folders):
        name = folder.resolve().name
        try:
            check_adapter_name(name)
        except ValueError:
            name = f"adapter{i}"
        while name in names or name == "mix":
            name = f"{name}_{i}"
        names.append(name)
    return names


def mix_folders(adapters: Sequence[str | os.PathLike], out: str | os.PathLike,
                how: str = "task_arithmetic", weights: Sequence[float] | None = None, model: str | None = None,
                **options: Any) -> dict[str, Any]:
    """Mix the adapter folders ``adapters`` into folder ``out``; returns the mix report as a dict.

    ``options``: ``density``, ``majority_sign``, ``seed``, ``rank``, ``energy`` of :func:`lorakit.combine`.
    Refused before anything is written: fewer than two folders (or a missing one), folders that record different
    base models, DARE without ``seed`` (a saved mix must be reproducible from its command line), and every input
    :func:`lorakit.combine` refuses.
    """
    import torch

    folders = [Path(a) for a in adapters]
    if len(folders) < 2:
        raise ValueError("lorakit mix needs at least two adapter folders")
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(f"adapter folder(s) {missing} do not exist")
    weights = [1.0] * len(folders) if weights is None else list(weights)
    if len(weights) != len(folders):
        raise ValueError(f"{len(weights)} weight(s) for {len(folders)} adapter(s); give one per adapter")
    if how.startswith("dare") and options.get("seed") is None:
        raise ValueError(f"--how {how} drops entries at random: give --seed N so the saved mix can be made again "
                         "(the same seed gives the same mix)")
    if how in TASK_VECTOR_RULES:  # the options' own checks, before the base model loads
        check_mix_options(how, options.get("density"), options.get("majority_sign", "total"), options.get("seed"),
                          options.get("rank"), options.get("energy"))
    recorded = {str(f): _recorded_base(f) for f in folders}
    bases = {b for b in recorded.values() if b is not None}
    if len(bases) > 1:
        detail = "; ".join(f"{f} on {b}" for f, b in recorded.items() if b is not None)
        raise ValueError(f"the adapters were trained on different base models ({detail}); mixing needs one base")
    infos = [_base_info(f, model) for f in folders]
    paths = {os.path.realpath(i["model"]) for i in infos}
    if len(paths) > 1:
        raise ValueError(f"the adapters belong to different base models ({sorted(paths)}); mixing needs one base")
    info = infos[0]
    labels = info.get("labels")
    base, _ = load_base(info["model"], info["task"], num_labels=len(labels) if labels else None)
    names = _names(folders)
    for folder, name in zip(folders, names):
        load(base, folder, name=name)
    with torch.no_grad():
        combine(base, dict(zip(names, weights)), name="mix", how=how, **options)
    if how in TASK_VECTOR_RULES:
        report = mix_report(base, "mix").to_dict()
    else:
        report = {"name": "mix", "how": how, "weights": dict(zip(names, weights)), **options}
    report["adapters"] = {n: str(f) for n, f in zip(names, folders)}
    run = {k: v for k, v in info.items() if k in ("model", "task", "labels", "max_length")}

    def write(tmp: Path) -> None:
        save(base, tmp, names=["mix"])
        atomic_write_text(tmp / RUN_FILE, json.dumps(run, indent=2) + "\n")
        atomic_write_text(tmp / "mix_report.json", json.dumps(report, indent=2) + "\n")

    atomic_folder(Path(out), write)
    return report
