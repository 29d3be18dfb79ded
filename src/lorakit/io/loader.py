"""The one transactional loader both formats use: adapters in lorakit's layout (a lorakit folder as read, or a
PEFT folder once translated) are checked against the unchanged model, then committed, and every change is rolled
back on any error, so a failed load leaves the model exactly as it was.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..config import AdapterConfig
from ..layers import AdaptedLayer
from ..model import AttachPlan, build_plan, check_adapter_name, commit_plan, delete, set_active
from ..registry import registry, registry_or_none
from .files import SEP, AdapterLoadError


@dataclass
class AdapterToLoad:
    """One adapter of a folder, in lorakit's layout, on its way into a model."""

    entry: dict[str, Any]  # {"config", "layers", "modules_to_save", "extra"}, as in lorakit_config.json
    tensors: dict[str, torch.Tensor]  # the folder's tensors, keyed "<saved_name>|<kind>|<path>|<tensor>"
    saved_name: str  # the adapter's name in ``tensors``
    new_name: str  # its name on the model
    folder: Path  # where it was read from (named in errors)
    weights_file: Path  # the file ``tensors`` came from (named in errors)


def choose_adapters(model: nn.Module, available: Sequence[str], name: str | None, folder: Path,
                    what: str = "adapters", new_names: bool = True) -> list[tuple[str, str]]:
    """``(saved name, new name)`` of the adapters a load installs: all under their own names (``name=None``), the
    only one renamed to ``name``, or the one called ``name``. Refuses invalid names and (``new_names=True``, a load)
    names the model has.

    Example:
        >>> import torch
        >>> choose_adapters(torch.nn.Linear(2, 2), ["default"], "mine", Path("adapter"))
        [('default', 'mine')]
    """
    if name is None:
        chosen = [(n, n) for n in available]
    elif len(available) == 1:
        chosen = [(next(iter(available)), name)]
    elif name in available:
        chosen = [(name, name)]
    else:
        raise AdapterLoadError(f"{folder} holds {what} {list(available)}; name={name!r} is none of them")
    for _, new_name in chosen:
        check_adapter_name(new_name)
    reg = registry_or_none(model)
    taken = [new for _, new in chosen if new_names and reg is not None and new in reg.configs]
    if taken:
        raise AdapterLoadError(f"adapter name(s) {taken} already exist on the model; pass name=... or delete them")
    return chosen


def install_adapters(model: nn.Module, adapters: Sequence[AdapterToLoad], trainable: bool = False,
                     foreign: type[AdapterLoadError] | None = None) -> nn.Module:
    """Add ``adapters`` to ``model`` all-or-nothing; they become the active ones.

    Every key, shape and dtype is checked against the unchanged model first; then each adapter is committed, and
    any error (Ctrl-C included) removes what this call added and puts back base weights, modules_to_save weights,
    trainable flags and the active list exactly. ``foreign``: for a translated folder (PEFT), the error class a
    plain KeyError/ValueError/TypeError is re-raised as, naming the folder.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/adapter")
        >>> from lorakit.io.lorakit_format import WEIGHTS_FILE, read_folder
        >>> meta, tensors = read_folder(folder)
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> item = AdapterToLoad(meta["adapters"]["default"], tensors, "default", "x", folder, folder / WEIGHTS_FILE)
        >>> _ = install_adapters(fresh, [item])
        >>> lorakit.adapter_names(fresh)
        ['x']
    """
    if len(adapters) > 1:  # check every adapter against the unchanged model before committing any
        for item in adapters:
            with _errors_as(foreign, item.folder):
                _prepare_one(model, item)
    snapshot = _LoadSnapshot.take(model, [m for item in adapters for m in item.entry.get("modules_to_save", [])])
    done: list[str] = []
    try:
        for item in adapters:
            with _errors_as(foreign, item.folder):
                _load_one(model, item, trainable, snapshot)
            done.append(item.new_name)
        set_active(model, [item.new_name for item in adapters])  # may refuse (a merged adapter's head): rolled back
    except BaseException:  # roll back what this call changed (also on Ctrl-C), so the model is as it was
        snapshot.roll_back(model, done)
        raise
    return model


@contextlib.contextmanager
def _errors_as(foreign: type[AdapterLoadError] | None, folder: Path) -> Iterator[None]:
    if foreign is None:
        yield
        return
    try:
        yield
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, AdapterLoadError):
            raise
        raise foreign(f"{folder}: {exc}") from None


@dataclass
class _LoadSnapshot:
    """What a load changes besides adding adapters, kept to undo it exactly."""

    modules: dict[str, dict[str, torch.Tensor]]  # modules_to_save weights, by module path
    grad: list[tuple[nn.Parameter, bool]]  # every parameter's trainable flag
    active: list[str] | None  # the active adapters (None: the model had no adapters)
    # base weights a committed shift changed (PiSSA, Delta-LoRA): delete's undo of a shift may round
    weights: list[tuple[AdaptedLayer, torch.Tensor]]

    @classmethod
    def take(cls, model: nn.Module, module_paths: list[str]) -> "_LoadSnapshot":
        reg = registry_or_none(model)
        modules = {}
        for p in module_paths:
            with contextlib.suppress(AttributeError):
                modules[p] = {k: v.detach().clone() for k, v in model.get_submodule(p).state_dict().items()}
        return cls(modules, [(p, p.requires_grad) for p in model.parameters()],
                   list(reg.active) if reg is not None else None, [])

    def roll_back(self, model: nn.Module, loaded: list[str]) -> None:
        for n in reversed(loaded):
            delete(model, n)
        for layer, weight in reversed(self.weights):
            layer.ops.set_weight_matrix(weight)
            for adapter in layer.adapters.values():
                adapter.on_base_changed()
        for mpath, state in self.modules.items():
            model.get_submodule(mpath).load_state_dict(state)
        for p, flag in self.grad:
            p.requires_grad_(flag)
        reg = registry_or_none(model)
        if reg is not None and self.active is not None:
            set_active(model, [n for n in self.active if n in reg.configs])


def _prepare_one(model: nn.Module, item: AdapterToLoad):
    """Build ``item`` on the side and check every key, shape and dtype; the model is not changed."""
    entry, tensors, saved_name, new_name, folder = (item.entry, item.tensors, item.saved_name, item.new_name,
                                                    item.folder)
    try:
        config = AdapterConfig.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterLoadError(f"{folder}: adapter {saved_name!r} has an invalid config: {err}") from None
    layers = list(entry.get("layers", []))
    located = config.replace(targets=layers, exclude=None) if layers else config
    prints = (entry.get("extra") or {}).get("base_fingerprints")  # absent in adapters saved before 0.2: no check
    if prints is not None and not (isinstance(prints, dict)
                                   and all(isinstance(v, str) for v in prints.values())):
        raise AdapterLoadError(f"{folder}: adapter {saved_name!r} has an invalid extra.base_fingerprints "
                               f"({type(prints).__name__}); it must map layer paths to fingerprint strings (the "
                               "file was damaged or edited by hand)")
    try:
        plan = build_plan(model, located, new_name, init=False, base_fingerprints=prints)
    except (TypeError, ValueError) as err:
        if isinstance(err, AdapterLoadError):
            raise
        raise AdapterLoadError(f"{folder}: adapter {saved_name!r} does not fit this model: {err}") from None
    plan.config = config
    prefix = saved_name + SEP
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected: dict[str, tuple[Any, str, str]] = {}
    for path, layer, _, adapter, _ in plan.entries:
        for tname in adapter.export_state():
            expected[SEP.join(("layer", path, tname))] = (adapter, tname, path)
    if plan.shared is not None:
        for tname in plan.shared.state_dict():
            expected[SEP.join(("shared", "", tname))] = (plan.shared, tname, "")
    for mpath, _, _, own in plan.copies:  # the new adapter's copies, built on the side
        for tname in own.state_dict():
            expected[SEP.join(("module", mpath, tname))] = (own, tname, mpath)
    missing = sorted(set(expected) - set(mine))
    unexpected = sorted(set(mine) - set(expected))
    if missing or unexpected:
        raise AdapterLoadError(
            f"{folder}: adapter {saved_name!r} does not fit this model; "
            f"missing keys: {few_keys(missing)}; unexpected keys: {few_keys(unexpected)}"
        )
    for key, (owner, tname, _) in expected.items():
        have = owner.state_dict()[tname]
        if tuple(have.shape) != tuple(mine[key].shape):
            raise AdapterLoadError(f"{folder}: {key} has shape {tuple(mine[key].shape)}, the model needs "
                                   f"{tuple(have.shape)} (was it saved from a different model or config?)")
        check_dtype(have, mine[key], f"{item.weights_file}: tensor {saved_name + SEP + key!r}")
    return plan, mine


def check_dtype(have: torch.Tensor, got: torch.Tensor, what: str) -> None:
    """Floating tensors must be saved as floating ones (and integer ones as integers): a cast would change values.

    Example:
        >>> check_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float16), "tensor 'x'")
    """
    if have.is_floating_point() != got.is_floating_point() or have.is_complex() != got.is_complex():
        raise AdapterLoadError(f"{what} is {str(got.dtype).replace('torch.', '')}, but the model needs a "
                               f"{str(have.dtype).replace('torch.', '')} tensor there; the file was damaged or "
                               f"written by another tool")


def build_loaded(model: nn.Module, item: AdapterToLoad, foreign: type[AdapterLoadError] | None = None) -> AttachPlan:
    """``item`` built on the side exactly as a load would install it (every key, shape, dtype and config checked,
    the new adapters filled with the saved tensors) but not committed: the model is not changed. ``item.new_name``
    must be free on the model. Used by :func:`lorakit.hotswap`, which copies the values into attached adapters.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/adapter")
        >>> from lorakit.io.lorakit_format import WEIGHTS_FILE, read_folder
        >>> meta, tensors = read_folder(folder)
        >>> item = AdapterToLoad(meta["adapters"]["default"], tensors, "default", "x", folder, folder / WEIGHTS_FILE)
        >>> plan = build_loaded(net, item)
        >>> torch.equal(plan.entries[0].adapter.A, net[0].adapters["default"].A), lorakit.adapter_names(net)
        (True, ['default'])
    """
    with _errors_as(foreign, item.folder):
        plan, mine = _prepare_one(model, item)
        _fill(plan, mine)
    return plan


def _fill(plan: AttachPlan, mine: dict[str, torch.Tensor]) -> None:
    """Put the saved tensors into the plan's new adapters, shared state and head copies (not yet in the model)."""
    for path, layer, _, adapter, _ in plan.entries:
        adapter.import_state({t: mine[SEP.join(("layer", path, t))] for t in adapter.export_state()})
    if plan.shared is not None:
        plan.shared.load_state_dict({t: mine[SEP.join(("shared", "", t))] for t in plan.shared.state_dict()})
    for mpath, _, _, own in plan.copies:
        own.load_state_dict({t: mine[SEP.join(("module", mpath, t))] for t in own.state_dict()})


def _load_one(model: nn.Module, item: AdapterToLoad, trainable: bool, snapshot: _LoadSnapshot) -> None:
    plan, mine = _prepare_one(model, item)
    _fill(plan, mine)  # everything fits: fill the new adapters (not yet part of the model), then commit
    plan.entries = [entry._replace(init_result=_shifted_base(entry.layer, entry.adapter)) for entry in plan.entries]
    # base weights a shift will change, kept exactly for a rollback
    snapshot.weights.extend((layer, layer.ops.weight_matrix().clone())
                            for _, layer, _, _, shifted in plan.entries if shifted is not None)
    commit_plan(model, plan, make_active=False, trainable=trainable)
    registry(model).extra[item.new_name] = dict(item.entry.get("extra", {}))


def _shifted_base(layer: AdaptedLayer, adapter: Any) -> torch.Tensor | None:
    shift = adapter.base_shift()
    if shift is None:
        return None
    return layer.ops.weight_matrix(torch.float32) + shift.to(layer.ops.device())


def few_keys(keys: list[str], limit: int = 8) -> str:
    """The first ``limit`` keys for an error message, and how many more there are.

    Example:
        >>> few_keys(["a", "b", "c"], limit=2)
        'a, b (+1 more)'
    """
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
