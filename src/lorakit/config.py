"""AdapterConfig: one validated, JSON-serialisable configuration for every family member.

Common fields apply to every method; method-specific fields are ignored by methods that do not use them. Every
field's type is checked for every method (a bool is never a number, a string never a number), and the range of a
method-specific field by the method that uses it (``methods/<name>.py``), so a bad value fails at construction
time, before any model is touched.

This module imports nothing of lorakit: the method registry (:mod:`lorakit.methods`, imported by ``import lorakit``)
plugs itself in with :func:`use_method_registry`, and validation asks it which methods exist and what they check.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Collection, Mapping, Sequence

SCALINGS = ("standard", "rslora")
INITS = ("kaiming", "gaussian", "init_b", "pissa", "pissa_fast", "orthogonal", "loftq")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"AdapterConfig.{field_name}={value!r} is invalid; allowed: {allowed}{_string_hint(value)}")


def _string_hint(value: Any) -> str:
    """A hint for a number written as a string (quoted in YAML/JSON), which is never taken for the number."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (this is a string; write the number without quotes)"
    return ""


def is_number(value: Any) -> bool:
    """True for a finite int or float; bools are not numbers (``True`` is not 1 in a config)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


# Seeds reach torch.Generator.manual_seed, which takes this range.
SEED_RANGE = (-(2**63), 2**64)


def coerce_field(owner: str, name: str, value: Any, annotation: str) -> Any:
    """``value`` checked against a dataclass field's declared type (``"int"``, ``"float | None"``, ``"bool"``, ...).

    Numbers written as strings (YAML 1.1 reads ``2e-4`` as a string) become numbers, and an integral float (``4.0``)
    an int; nothing else is converted: a bool is not a number, ``"maybe"`` is not a bool, ``2.5`` is not an int.
    Raises ValueError ``"<owner>.<name>=<value> is invalid; allowed: ..."`` (``"<name>=..."`` when ``owner`` is
    empty). Unknown annotations (lists, dicts) pass unchecked: the caller checks those.

    Example:
        >>> coerce_field("TrainConfig", "lr", "2e-4", "float")
        0.0002
    """
    kinds = {k.strip() for k in str(annotation).split("|")}
    optional = "None" in kinds
    kinds.discard("None")
    if value is None and optional:
        return None

    def fail(allowed: str) -> None:
        hint = ""
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            hint = " (this is a string; write true or false without quotes)"
        where = f"{owner}.{name}" if owner else name
        raise ValueError(f"{where}={value!r} is invalid; allowed: {'None or ' if optional else ''}{allowed}{hint}")

    if kinds == {"bool"}:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kinds == {"int"}:
        number = _parse_number(value)
        if number is None or not (is_int(number) or number.is_integer()):
            fail("an integer")
        return int(number)
    if kinds == {"float"}:
        number = _parse_number(value)
        if number is None:
            fail("a finite number")
        return number
    if kinds == {"str"}:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            fail("a string" + (" (quote it, e.g. \"123\")" if is_number(value) else ""))
        return value
    return value


def _parse_number(value: Any) -> int | float | None:
    """A finite int/float from a number or a numeric string; None for anything else (bools included)."""
    if is_number(value):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _is_schedule(value: Any) -> bool:
    """SoRA's schedule shape: a list of numbers or of [step, number] pairs (ranges are checked by SoRA)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        return False
    return all(is_number(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and is_int(v[0]) and is_number(v[1]))
               for v in value)


# The type of every field that not every method validates (so no method ignores a wrong type): name -> (check,
# allowed). Ranges that only matter to one method are checked by that method's validate_config.
_TYPES: dict[str, tuple[Any, str]] = {
    "dora_detach_norm": (lambda v: isinstance(v, bool), "True or False"),
    "save_projection": (lambda v: isinstance(v, bool), "True or False"),
    "d_initial": (is_number, "a finite number"),
    "target_r": (lambda v: v is None or is_int(v), "None or an integer"),
    "total_steps": (lambda v: v is None or is_int(v), "None or an integer"),
    "t_init": (is_int, "an integer"),
    "t_final": (is_int, "an integer"),
    "delta_t": (is_int, "an integer"),
    "beta1": (is_number, "a finite number"),
    "beta2": (is_number, "a finite number"),
    "orth_reg": (is_number, "a finite number"),
    "final_ranks": (lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and is_int(r)
                                                                        for k, r in v.items())),
                    "None or {layer path: kept rank}"),
    "sora_xi": (is_number, "a finite number"),
    "sora_lr": (lambda v: v is None or is_number(v), "None or a finite number"),
    "sora_schedule": (lambda v: v is None or _is_schedule(v),
                      "None, a list of numbers or a list of [start_step, xi] pairs"),
    "drop_fraction": (is_number, "a finite number"),
    "drop_threshold": (is_number, "a finite number"),
    "drop_top_n": (lambda v: v is None or is_int(v), "None or an integer"),
    "drop_selected": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(p, str) and p
                                                                                     for p in v)),
                      "None or a list of layer paths"),
    "delta_lambda": (is_number, "a finite number"),
    "delta_start": (is_int, "an integer"),
}


@dataclass(frozen=True)
class MethodRegistryHook:
    """How validation reaches the method registry without importing it: ``names()`` lists the registered methods,
    ``lookup(name)`` gives a method's strategy class (its ``default_r`` and ``validate_config``; ImportError if its
    file fails to import)."""

    names: Callable[[], Collection[str]]
    lookup: Callable[[str], Any]


_method_registry: list[MethodRegistryHook] = []  # set once, by lorakit.methods at import


def use_method_registry(names: Callable[[], Collection[str]], lookup: Callable[[str], Any]) -> None:
    """Plug the method registry into config validation (called by :mod:`lorakit.methods` when it is imported).

    Example:
        >>> import lorakit.methods  # registers itself; calling this again replaces the hook
        >>> AdapterConfig(method="lora").r
        8
    """
    _method_registry[:] = [MethodRegistryHook(names, lookup)]


def _methods() -> MethodRegistryHook:
    if not _method_registry:
        raise RuntimeError("lorakit's method registry is not loaded; import lorakit (or lorakit.methods) first")
    return _method_registry[0]


@dataclass
class AdapterConfig:
    """Configuration of one adapter.

    Example:
        >>> cfg = AdapterConfig(method="lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
        >>> cfg.scaling_value()
        2.0
        >>> AdapterConfig.from_json(cfg.to_json()) == cfg
        True
    """

    method: str = "lora"
    r: int | None = None  # None: the method's default (8; VeRA 256)
    alpha: float | None = None  # None means alpha = r
    dropout: float = 0.0
    targets: Any = "all-linear"  # "all-linear", list of name suffixes (or regexes), or a regex string (full match)
    exclude: Any = None  # same forms as targets; matched modules are never adapted
    scaling: str = "standard"  # "standard": alpha/r, "rslora": alpha/sqrt(r)
    init: str = "kaiming"
    modules_to_save: Sequence[str] = ()
    rank_pattern: dict[str, int] | None = None  # regex/suffix -> rank
    alpha_pattern: dict[str, float] | None = None  # regex/suffix -> alpha
    seed: int | None = None  # seeds adapter init (and frozen random matrices) for reproducibility
    pissa_niter: int = 4  # power iterations of the randomised SVD for init="pissa_fast"
    loftq_iter: int = 1  # alternating steps for init="loftq"
    # DoRA
    dora_detach_norm: bool = True  # paper §4.3: treat ||W + sBA|| as a constant in backward
    # VeRA
    d_initial: float = 0.1
    save_projection: bool = True  # save VeRA's shared pair / LoRA-FA's frozen A (False: regenerate from seeds)
    # AdaLoRA
    target_r: int | None = None
    total_steps: int | None = None
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1
    final_ranks: dict[str, int] | None = None  # set by AdaLoRA's finish: layer path -> kept rank (0 allowed)
    # SoRA
    sora_xi: float = 1e-4  # soft-threshold strength; threshold per step = lr * xi
    sora_lr: float | None = None  # gate learning rate (None: the main lr)
    sora_schedule: Sequence[float] | None = None  # optional increasing xi values (sparsifying schedule)
    # LoRA-drop
    drop_fraction: float = 0.1
    drop_threshold: float = 0.9
    drop_top_n: int | None = None
    drop_selected: Sequence[str] | None = None  # stage-2 layers keeping their own pair (None: every layer)
    # Delta-LoRA
    delta_lambda: float = 2.0
    delta_start: int = 500

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise ValueError naming the field, the bad value and the allowed ones."""
        methods = _methods()
        known = methods.names()
        if not isinstance(self.method, str) or self.method not in known:
            _fail("method", self.method, ", ".join(sorted(known)))
        try:
            method_cls = methods.lookup(self.method)
        except ImportError as exc:  # registered but its file failed to import
            raise ValueError(f"AdapterConfig.method={self.method!r} is not available here: {exc}") from exc
        if self.r is None:
            self.r = method_cls.default_r
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            _fail("r", self.r, "an integer >= 1")
        if self.alpha is not None and (not is_number(self.alpha) or self.alpha <= 0):
            _fail("alpha", self.alpha, "None (alpha = r) or a positive number")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "a number in [0, 1)")
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if name == "exclude" and value is None:
                continue
            if isinstance(value, str):
                if value != "all-linear":
                    _check_regex(name, value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
                setattr(self, name, list(value))
            else:
                _fail(name, value, '"all-linear", a non-empty list of module-name suffixes, or a regex string')
        if not isinstance(self.scaling, str) or self.scaling not in SCALINGS:
            _fail("scaling", self.scaling, ", ".join(SCALINGS))
        if not isinstance(self.init, str) or self.init not in INITS:
            _fail("init", self.init, ", ".join(INITS))
        if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(m, str) and m for m in self.modules_to_save):
            _fail("modules_to_save", self.modules_to_save, "a list of module names")
        self.modules_to_save = list(self.modules_to_save)
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = getattr(self, name)
            if pattern is None:
                continue
            if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and isinstance(v, kind) and is_number(v) and v > 0
                for k, v in pattern.items()
            ):
                _fail(name, pattern, "None or a dict {module-name suffix or regex: positive number}")
        if self.seed is not None and (not is_int(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            _fail("seed", self.seed, "None or an integer in [-2**63, 2**64)")
        for name in ("pissa_niter", "loftq_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "an integer >= 1")
        for name, (check, allowed) in _TYPES.items():  # types of the method-specific fields, for every method
            if not check(getattr(self, name)):
                _fail(name, getattr(self, name), allowed)
        for name in ("sora_schedule", "drop_selected"):  # lists, as JSON gives them back
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [list(v) if isinstance(v, tuple) else v for v in value])
        method_cls.validate_config(self)

    # -- derived values -------------------------------------------------------------------------------------
    def rank_for(self, path: str) -> int:
        """Rank for the module at ``path`` (``rank_pattern`` overrides ``r``)."""
        return int(_pattern_lookup(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        """Alpha for the module at ``path`` (``alpha_pattern`` overrides ``alpha``; None means alpha = rank)."""
        default = self.alpha if self.alpha is not None else self.rank_for(path)
        return float(_pattern_lookup(self.alpha_pattern, path, default))

    def scaling_value(self, path: str = "") -> float:
        """The LoRA scaling s for the module at ``path``: alpha/r (standard) or alpha/sqrt(r) (rsLoRA)."""
        r = self.rank_for(path)
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(r) if self.scaling == "rslora" else alpha / r

    # -- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-compatible dict of every field."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build from a dict; unknown keys raise ValueError naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"AdapterConfig must be built from a mapping of field names to values, got "
                             f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted((k for k in data if k not in known), key=repr)
        if unknown:
            raise ValueError(f"AdapterConfig got unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """JSON text of the config."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"AdapterConfig JSON is invalid ({err})") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A validated copy with some fields changed."""
        known = {f.name for f in fields(self)}
        unknown = sorted(k for k in changes if k not in known)
        if unknown:
            raise ValueError(f"AdapterConfig got unknown field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)


def _check_regex(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        _fail(name, value, f'"all-linear", a list of names or a valid regex ({err})')


def name_matches(name: str, path: str) -> bool:
    """True if ``name`` names the module at ``path``: the path itself, a dotted suffix of it, or a regex matching all
    of it (an invalid regex matches nothing). The one rule for ``targets``/``exclude`` lists, ``modules_to_save``,
    ``rank_pattern``/``alpha_pattern`` and quantisation's ``skip`` (PEFT's own key rule is PEFT's, kept apart).

    Example:
        >>> name_matches("q_proj", "layers.0.attn.q_proj"), name_matches("layers[.]0[.].*", "layers.0.attn.k")
        (True, True)
        >>> name_matches("proj", "layers.0.attn.q_proj")
        False
    """
    if path == name or path.endswith("." + name):
        return True
    try:
        return re.fullmatch(name, path) is not None
    except re.error:
        return False


def _pattern_lookup(pattern: dict[str, Any] | None, path: str, default: Any) -> Any:
    """Value of the first key of ``pattern`` that names ``path`` (:func:`name_matches`), else ``default``."""
    if not pattern:
        return default
    for key, value in pattern.items():
        if name_matches(key, path):
            return value
    return default

