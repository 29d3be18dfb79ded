"""AdapterConfig: one validated, JSON-serialisable configuration for every family member.

Common fields apply to every method; method-specific fields are ignored by methods that do not use them and
are validated by the method that does (``methods/<name>.py``), so a bad value fails at construction time,
before any model is touched.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

SCALINGS = ("standard", "rslora")
INITS = ("kaiming", "gaussian", "init_b", "pissa", "pissa_fast", "orthogonal", "loftq")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"AdapterConfig.{field_name}={value!r} is invalid; allowed: {allowed}")


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
        from .methods import METHODS, get_method

        if self.method not in METHODS:
            _fail("method", self.method, ", ".join(sorted(METHODS)))
        try:
            method_cls = get_method(self.method)
        except ImportError as exc:  # registered but its file failed to import
            raise ValueError(f"AdapterConfig.method={self.method!r} is not available here: {exc}") from exc
        if self.r is None:
            self.r = method_cls.default_r
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            _fail("r", self.r, "an integer >= 1")
        if self.alpha is not None and (not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha)
                                       or self.alpha <= 0):
            _fail("alpha", self.alpha, "None (alpha = r) or a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
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
        if self.scaling not in SCALINGS:
            _fail("scaling", self.scaling, ", ".join(SCALINGS))
        if self.init not in INITS:
            _fail("init", self.init, ", ".join(INITS))
        if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
            _fail("modules_to_save", self.modules_to_save, "a list of module names")
        self.modules_to_save = list(self.modules_to_save)
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = getattr(self, name)
            if pattern is None:
                continue
            if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) and v > 0
                for k, v in pattern.items()
            ):
                _fail(name, pattern, "None or a dict {module-name suffix or regex: positive number}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            _fail("seed", self.seed, "None or an integer")
        for name in ("pissa_niter", "loftq_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "an integer >= 1")
        get_method(self.method).validate_config(self)

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdapterConfig got unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """JSON text of the config."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_regex(name: str, value: str) -> None:
    import re

    try:
        re.compile(value)
    except re.error as err:
        _fail(name, value, f'"all-linear", a list of names or a valid regex ({err})')


def _pattern_lookup(pattern: dict[str, Any] | None, path: str, default: Any) -> Any:
    """First key of ``pattern`` that is a suffix of ``path`` (on a dot boundary) or fully matches it as a regex."""
    import re

    if not pattern:
        return default
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return value
        try:
            if re.fullmatch(key, path):
                return value
        except re.error:
            continue
    return default

