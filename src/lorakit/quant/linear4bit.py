"""A 4-bit NF4 linear layer that dequantises on the fly, and the functions that quantise, measure, save, load and
requantise whole models.

:class:`Linear4bit` keeps its weight only in packed NF4 form (buffers: 4 bits per weight plus block constants).
Forward dequantises to the compute dtype, runs ``F.linear`` and casts the output back to the input dtype; its
autograd function saves nothing dense, so backward dequantises again instead of keeping a dense weight per layer
alive between forward and backward. Gradients reach the input, never the weight.

Saving: every tensor of a :class:`Linear4bit` is a plain buffer (uint8 codes, fp32/uint8 constants), so a quantised
model's ``state_dict()`` is safetensors-ready. :func:`save_quantized` writes it (adapters, if any, in a subfolder)
with a JSON description of which layers are 4-bit; :func:`load_quantized` rebuilds the 4-bit layers in a freshly
built full-precision model (a "skeleton"), without quantising anything again, and loads the packed tensors.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import DQ_BLOCKSIZE, NF4Tensor, _check_blocksize, dequantize_blockwise_8bit, dequantize_parts, quantize_nf4

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANT_CONFIG_FILE = "lorakit_quant.json"
QUANT_WEIGHTS_FILE = "lorakit_quant.safetensors"
ADAPTER_SUBFOLDER = "adapters"


class _Dequant4bitLinear(torch.autograd.Function):
    """``y = x · deq(W)ᵀ + b``; backward dequantises again rather than saving the dense weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit", bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_b


class Linear4bit(nn.Module):
    """A linear layer whose weight is stored in NF4 (optionally double-quantised), bitsandbytes' layout.

    Buffers: ``weight_packed`` (uint8 ``[ceil(out·in/2), 1]``), ``absmax`` (fp32 ``[blocks]``, or uint8 codes with
    double quantisation, then also ``absmax2`` fp32 and ``absmax_offset`` fp32 scalar). ``bias`` stays a (frozen by
    attach) parameter in its original dtype. ``weight_dtype`` remembers the dtype of the dense weight it replaced:
    :meth:`to_linear` (used by merge/unload) returns a layer in that dtype when it is wider than the compute dtype
    (an fp32 model quantised with bf16 compute), so the dense layer still runs inside the rest of the model.

    Example:
        >>> import torch
        >>> layer = Linear4bit.from_linear(torch.nn.Linear(64, 8), compute_dtype=torch.float32)
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 8])
        >>> layer.dequantize().shape
        torch.Size([8, 64])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, double_quant: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 weight_dtype: torch.dtype | None = None):
        super().__init__()
        _check_blocksize(blocksize)
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype} is invalid; allowed: torch.float32, torch.bfloat16, "
                             "torch.float16")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype if weight_dtype is not None else compute_dtype
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        n = self.in_features * self.out_features
        blocks = -(-n // blocksize)
        self.register_buffer("weight_packed", torch.zeros(-(-n // 2), 1, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.zeros(-(-blocks // DQ_BLOCKSIZE), dtype=torch.float32,
                                                        device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, module: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                    double_quant: bool = True) -> "Linear4bit":
        """Quantise an ``nn.Linear`` (or transformers ``Conv1D``, whose ``[in, out]`` weight is transposed)."""
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            weight = module.weight.detach().t()
        else:
            raise ValueError(f"Linear4bit.from_linear needs nn.Linear or transformers Conv1D, got "
                             f"{type(module).__name__}")
        bias = getattr(module, "bias", None)
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, compute_dtype, blocksize, double_quant,
                    bias.dtype if bias is not None else torch.float32, device=weight.device,
                    weight_dtype=weight.dtype)
        layer.requantize_(weight)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.detach())
        layer.train(module.training)
        return layer

    def requantize_(self, matrix: torch.Tensor) -> None:
        """Quantise a dense ``[out, in]`` matrix into this layer's buffers (same block size and double quant)."""
        if tuple(matrix.shape) != (self.out_features, self.in_features):
            raise ValueError(f"requantize_ needs a [{self.out_features}, {self.in_features}] matrix, got "
                             f"{list(matrix.shape)}")
        q = quantize_nf4(matrix.detach().to(self.weight_packed.device), self.blocksize, self.double_quant)
        self.load_nf4(q)

    def load_nf4(self, q: NF4Tensor) -> None:
        """Copy an :class:`NF4Tensor` of this layer's geometry and settings into the buffers."""
        if q.shape != (self.out_features, self.in_features) or q.blocksize != self.blocksize \
                or q.double_quant != self.double_quant:
            raise ValueError(f"NF4 tensor {q.shape} (block {q.blocksize}, double_quant={q.double_quant}) does not "
                             f"fit this layer ({self.out_features}x{self.in_features}, block {self.blocksize}, "
                             f"double_quant={self.double_quant})")
        with torch.no_grad():
            self.weight_packed.copy_(q.packed)
            self.absmax.copy_(q.absmax)
            if self.double_quant:
                self.absmax2.copy_(q.absmax2)
                self.absmax_offset.copy_(q.offset)

    def nf4(self) -> NF4Tensor:
        """The stored weight as an :class:`NF4Tensor` (shares the buffers)."""
        dq = self.double_quant
        return NF4Tensor(self.weight_packed, self.absmax, (self.out_features, self.in_features), self.blocksize,
                         self.absmax2 if dq else None, self.absmax_offset if dq else None)

    # -- dense views -------------------------------------------------------------------------------------------
    def _block_constants(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.absmax2, DQ_BLOCKSIZE) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype`` (default: the compute dtype); computed, never cached."""
        return dequantize_parts(self.weight_packed, self._block_constants(), (self.out_features, self.in_features),
                                self.blocksize, dtype or self.compute_dtype)

    def dense_dtype(self) -> torch.dtype:
        """dtype of :meth:`to_linear`: the compute dtype, or the replaced weight's dtype if that is wider."""
        wide = torch.promote_types(self.compute_dtype, self.weight_dtype)
        return wide if wide in COMPUTE_DTYPES else self.compute_dtype

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding exactly the weight forward uses (``deq(Q)`` in the compute dtype), stored in
        :meth:`dense_dtype` (compute dtype; an fp32 model quantised with bf16 compute gets fp32 layers holding
        the bf16 values, which fp32 represents exactly)."""
        device = self.weight_packed.device
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=device,
                           dtype=self.dense_dtype())
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(self.compute_dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear.train(self.training)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        bias = self.bias.to(cd) if self.bias is not None else None
        return _Dequant4bitLinear.apply(x.to(cd), self, bias).to(x.dtype)

    # -- accounting --------------------------------------------------------------------------------------------
    def logical_numel(self) -> int:
        """Parameters this layer stands for: the full weight plus bias (used by parameter counts)."""
        return self.in_features * self.out_features + (self.bias.numel() if self.bias is not None else 0)

    def weight_bytes(self) -> int:
        """Resident bytes of the packed weight, its constants and the bias."""
        tensors = list(self.buffers(recurse=False)) + list(self.parameters(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def settings(self) -> dict[str, Any]:
        """JSON-ready constructor settings (used by :func:`save_quantized`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "compute_dtype": _dtype_name(self.compute_dtype), "blocksize": self.blocksize,
                "double_quant": self.double_quant, "weight_dtype": _dtype_name(self.weight_dtype),
                "bias_dtype": _dtype_name(self.bias.dtype) if self.bias is not None else "float32"}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# ---------------------------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------------------------
def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm/GroupNorm and the many RMSNorm classes (LlamaRMSNorm, ...) — QLoRA keeps every "norm" in fp32
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


#: what quantize() leaves in full precision when ``skip`` is not given (QLoRA's choice), where the model has it
DEFAULT_SKIP = ("lm_head",)


def _names_module(name: str, path: str) -> bool:
    """``name`` is ``path``, a dotted suffix of it, or a regex matching all of it."""
    return path == name or path.endswith("." + name) or re.fullmatch(name, path) is not None


def _skipped(path: str, skip: Sequence[str]) -> bool:
    """``path`` or one of the modules containing it is named by a ``skip`` entry (a container skips its layers)."""
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(_names_module(name, prefix) for name in skip for prefix in prefixes)


def _check_skip(model: nn.Module, skip: Sequence[str]) -> None:
    """Every ``skip`` entry must be a valid regex and name at least one module: a typo must not silently quantise
    the layer it meant to keep."""
    paths = [p for p, _ in model.named_modules() if p]
    for name in skip:
        try:
            re.compile(name)
        except re.error as err:
            raise ValueError(f"quantize(skip=...): {name!r} is not a valid regular expression ({err}); give a "
                             "module name, a dotted path suffix, or a regex matching a whole module path") from None
        if not any(_names_module(name, p) for p in paths):
            choices = sorted(set(paths) | {p.rsplit(".", 1)[-1] for p in paths})
            close = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"quantize(skip=...): {name!r} matches no module of this model, so nothing would be "
                             f"skipped.{hint} Entries are module names, dotted path suffixes, or regexes matching a "
                             "whole module path.")


def _quant_targets(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Module, str]]:
    """``(path, module, kind)`` of every layer to quantise; kind "plain" or "adapted" (an AdaptedLayer's base)."""
    from ..layers import AdaptedLayer

    found = []
    skip_prefixes: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, AdaptedLayer):
            skip_prefixes.append(path + ".")
            base = module.base
            if (isinstance(base, nn.Linear) or _is_conv1d(base)) and not _skipped(path, skip):
                if module.merged:
                    raise ValueError(f"{path} has merged adapters {module.merged}; unmerge them before quantize() "
                                     "(or use lorakit.quant.requantize on a merged, unloaded model)")
                found.append((path, module, "adapted"))
            continue
        if path and (isinstance(module, nn.Linear) or _is_conv1d(module)) and not _skipped(path, skip):
            found.append((path, module, "plain"))
    return found


def quantize(model: nn.Module, bits: int = 4, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
             skip: Sequence[str] | None = None, blocksize: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) of ``model`` in place by an NF4 :class:`Linear4bit`.

    * ``skip``: modules left in full precision, each given as a module name, a dotted path suffix or a regex
      matching a whole path; a container (e.g. a classification head module) skips every layer inside it. Each
      entry must be a valid regex and match at least one module (else ValueError, with close names). Default
      (None): ``lm_head``, where the model has one, as QLoRA does;
    * norms (LayerNorm, RMSNorm, any module whose class name contains "norm") are cast to fp32, as QLoRA does;
      every other module keeps its dtype (load the model in bf16 first to reproduce QLoRA's setup exactly);
    * layers already wrapped by lorakit adapters are quantised underneath their adapters (QPiSSA: attach
      ``init="pissa"`` first, then quantise, so the residual is what gets quantised);
    * a Conv1D comes back as a Linear4bit (and, after merging/unloading, as an ``nn.Linear``).

    All layers are quantised first and swapped in at the end, so an error leaves the model unchanged.
    Returns the model.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4))
        >>> _ = lorakit.quantize(net, compute_dtype=torch.float32)
        >>> type(net[0]).__name__
        'Linear4bit'
    """
    if bits != 4:
        raise ValueError(f"quantize(bits={bits!r}) is not supported; only bits=4 (NF4) is implemented")
    _check_blocksize(blocksize)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"quantize(compute_dtype={compute_dtype}) is invalid; allowed: torch.float32, "
                         "torch.bfloat16, torch.float16")
    if skip is None:
        skip = DEFAULT_SKIP
    else:
        if isinstance(skip, str):
            skip = (skip,)
        if not all(isinstance(s, str) for s in skip):
            raise ValueError(f"quantize(skip={skip!r}) must be a sequence of module names or regexes")
        _check_skip(model, skip)
    targets = _quant_targets(model, skip)
    if not targets:
        raise ValueError("quantize() found no nn.Linear/Conv1D layer to quantise (everything skipped?)")
    new = []
    for path, module, kind in targets:
        base = module.base if kind == "adapted" else module
        if not base.weight.dtype.is_floating_point:
            raise ValueError(f"{path}: weight dtype {base.weight.dtype} cannot be quantised")
        new.append((path, module, kind, Linear4bit.from_linear(base, compute_dtype, blocksize, double_quant)))
    # commit
    from ..layers import ops_for

    for path, module, kind, q in new:
        if kind == "adapted":
            module.base = q
            module.ops = ops_for(q)
            for adapter in module.adapters.values():
                adapter.on_base_changed()
        else:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, q)
    for module in model.modules():
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                p.data = p.data.float()
    return model


def model_weight_bytes(model: nn.Module) -> int:
    """Resident bytes of every parameter and buffer of ``model`` (shared tensors counted once; a 4-bit layer
    counts its packed codes and constants).

    Example:
        >>> import torch
        >>> model_weight_bytes(torch.nn.Linear(4, 4))
        80
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------------
def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors under their original names: adapters left out, ``x.base.w`` stored as ``x.w`` (and a
    ``modules_to_save`` module's ``x.original.w`` as ``x.w``; the adapters' copies are saved by lorakit.save)."""
    from ..model import adapted_layers, saved_modules

    layers = [(p, "base.") for p, _ in adapted_layers(model)] + [(p, "original.") for p, _ in saved_modules(model)]
    out = {}
    for key, t in model.state_dict().items():
        owner = next(((p, inner) for p, inner in layers if key.startswith(p + ".")), None)
        if owner is not None:
            rest = key[len(owner[0]) + 1:]
            if not rest.startswith(owner[1]):
                continue  # adapter tensors are saved by lorakit.save
            key = owner[0] + "." + rest[len(owner[1]):]
        out[key] = t
    return out


def _quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    from ..layers import AdaptedLayer
    from ..model import saved_modules

    wrappers = [p for p, _ in saved_modules(model)]  # modules_to_save: the original is the base, copies are not
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, Linear4bit):
            if path.endswith(".base") and isinstance(model.get_submodule(path[:-5]), AdaptedLayer):
                path = path[:-5]
            outer = next((w for w in wrappers if path.startswith(w + ".")), None)
            if outer is not None:
                rest = path[len(outer) + 1:]
                if not rest.startswith("original"):
                    continue
                path = outer + rest[len("original"):]
            found[path] = module.settings()
    return found


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a quantised model to folder ``path`` keeping the packed 4-bit form (safetensors + JSON); any attached
    lorakit adapters go to ``path/adapters`` (as :func:`lorakit.save`). Returns the folder.

    What is written is what the model holds now: for LoftQ/QPiSSA this is the modified quantised base, which is
    what the adapters were initialised against. Merged adapters must be unmerged (or unloaded) first.

    Example:
        >>> import torch, tempfile, lorakit
        >>> net = lorakit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), compute_dtype=torch.float32)
        >>> folder = save_quantized(net, tempfile.mkdtemp() + "/q")
        >>> fresh = load_quantized(torch.nn.Sequential(torch.nn.Linear(64, 8)), folder)
    """
    from safetensors.torch import save_file

    from ..io import atomic_folder
    from ..io import save as save_adapters
    from ..model import _registry, adapted_layers

    merged = [p for p, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"save_quantized: layers {merged[:5]} hold merged adapters; call lorakit.unmerge(model) "
                         "(or lorakit.unload) first")
    layers = _quantized_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no 4-bit layer; call lorakit.quantize(model) first")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in _base_state(model).items()}
    dtypes = {k: _dtype_name(v.dtype) for k, v in state.items()}
    meta = {"format": "lorakit-quant", "version": 1, "layers": layers, "dtypes": dtypes}
    has_adapters = _registry(model) is not None

    def write(folder: Path) -> None:
        save_file(state, str(folder / QUANT_WEIGHTS_FILE), metadata={"format": "lorakit-quant"})
        (folder / QUANT_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if has_adapters:
            save_adapters(model, folder / ADAPTER_SUBFOLDER)

    atomic_folder(Path(path), write)
    return Path(path)


def load_quantized(model: nn.Module, path: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Load :func:`save_quantized`'s folder into ``model``, a freshly built (full-precision) model of the same
    architecture: the saved 4-bit layers replace its linear layers (nothing is quantised again), every tensor is
    loaded, norms and other tensors take their saved dtypes, and saved adapters are attached (frozen unless
    ``trainable``). Checks names and shapes before changing the model. Returns the model.
    """
    from safetensors.torch import load_file

    from ..io import load as load_adapters

    folder = Path(path)
    cfg_file, w_file = folder / QUANT_CONFIG_FILE, folder / QUANT_WEIGHTS_FILE
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(f"{str(folder)!r} is not a save_quantized folder (needs {QUANT_CONFIG_FILE} and "
                                f"{QUANT_WEIGHTS_FILE})")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != "lorakit-quant":
        raise ValueError(f"{cfg_file}: not a lorakit quantised-model description")
    from ..model import _registry

    if _registry(model) is not None:
        raise ValueError("load_quantized needs a freshly built model without lorakit adapters")
    tensors = load_file(str(w_file))
    # build the 4-bit layers on the side
    new: dict[str, Linear4bit] = {}
    for lpath, s in meta["layers"].items():
        try:
            old = model.get_submodule(lpath)
        except AttributeError:
            raise ValueError(f"load_quantized: the model has no module {lpath!r} (different architecture?)") from None
        if isinstance(old, Linear4bit):
            shape = (old.out_features, old.in_features)
        elif _is_conv1d(old):
            shape = (old.weight.shape[1], old.weight.shape[0])
        elif isinstance(old, nn.Linear):
            shape = tuple(old.weight.shape)
        else:
            raise ValueError(f"load_quantized: {lpath} is {type(old).__name__}; the saved 4-bit layer needs an "
                             "nn.Linear/Conv1D there (pass a freshly built model without adapters)")
        if shape != (s["out_features"], s["in_features"]):
            raise ValueError(f"load_quantized: {lpath} is {type(old).__name__} of shape {shape}, the saved layer "
                             f"is {s['out_features']}x{s['in_features']}")
        new[lpath] = Linear4bit(s["in_features"], s["out_features"], s["bias"], _dtype_from_name(s["compute_dtype"]),
                                s["blocksize"], s["double_quant"], _dtype_from_name(s["bias_dtype"]),
                                weight_dtype=_dtype_from_name(s.get("weight_dtype", s["compute_dtype"])))
    # check every key and shape of the would-be model
    expected: dict[str, tuple[nn.Module, str, bool]] = {}
    for mpath, module in model.named_modules():
        if any(mpath == p or mpath.startswith(p + ".") for p in new):
            continue
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            expected[f"{mpath}.{name}" if mpath else name] = (module, name, False)
    for lpath, layer in new.items():
        for key in layer.state_dict():
            expected[f"{lpath}.{key}"] = (layer, key, True)
    persistent = set(_persistent_keys(model, new))
    missing = sorted(k for k in persistent if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise ValueError(f"load_quantized: {folder} does not fit this model; missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for key, t in tensors.items():
        owner, name, _ = expected[key]
        have = getattr(owner, name)
        if tuple(have.shape) != tuple(t.shape):
            raise ValueError(f"load_quantized: {key} has shape {tuple(t.shape)}, the model needs {tuple(have.shape)}")
    # commit
    for lpath, layer in new.items():
        parent_path, _, child = lpath.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
    with torch.no_grad():
        for key, t in tensors.items():
            owner, name, _ = expected[key]
            have = getattr(owner, name)
            # copies: ``tensors`` must stay pristine for _restore_quantized_bases below
            value = t.to(have.device, copy=True)
            if isinstance(have, nn.Parameter):
                have.data = value
            else:
                setattr(owner, name, value)
    adapters = folder / ADAPTER_SUBFOLDER
    if adapters.is_dir():
        load_adapters(model, adapters, trainable=trainable)
        # lorakit.load re-applies base shifts (PiSSA's residual) to what it takes for the original weights; the
        # saved 4-bit base already is the shifted one, so put the exact saved codes back
        _restore_quantized_bases(model, tensors, list(new))
    return model


def _persistent_keys(model: nn.Module, new: dict[str, nn.Module]) -> list[str]:
    keys = []
    for key in model.state_dict():
        if any(key.startswith(p + ".") for p in new):
            continue
        keys.append(key)
    for lpath, layer in new.items():
        keys += [f"{lpath}.{k}" for k in layer.state_dict()]
    return keys


def _restore_quantized_bases(model: nn.Module, tensors: dict[str, torch.Tensor], paths: Iterable[str]) -> None:
    from ..layers import AdaptedLayer

    for lpath in paths:
        module = model.get_submodule(lpath)
        layer = module.base if isinstance(module, AdaptedLayer) else module
        if not isinstance(layer, Linear4bit):
            continue
        with torch.no_grad():
            for key, buf in layer.named_buffers(recurse=False):
                buf.copy_(tensors[f"{lpath}.{key}"])
        if isinstance(module, AdaptedLayer):
            for adapter in module.adapters.values():
                adapter.on_base_changed()


# ---------------------------------------------------------------------------------------------------------------
# merge back to 4-bit (explicit, warned)
# ---------------------------------------------------------------------------------------------------------------
def requantize(model: nn.Module, sample: Any = None, warn: bool = True) -> dict[str, Any]:
    """Merge the active adapters of a model with a 4-bit base and store the merged weights in 4-bit again.

    The default :func:`lorakit.merge`/:func:`lorakit.unload` dequantise instead (exact). Requantising rounds
    ``deq(Q) + ΔW`` to NF4 once more, so the model **changes**: this function measures by how much and warns.
    Returns a report: per layer the relative weight change ``‖deq(Q') − (deq(Q)+ΔW)‖ / ‖deq(Q)+ΔW‖``, and, if a
    ``sample`` input (a tensor, or a dict of keyword arguments) is given, the model output before and after
    (``max_abs_output_change``, ``rel_output_change``). The model comes back unloaded (no lorakit objects) with
    :class:`Linear4bit` layers using each layer's original block size, double quantisation and compute dtype.

    Example:
        >>> import torch, lorakit, warnings
        >>> net = lorakit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), compute_dtype=torch.float32)
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, init="init_b"))
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     report = requantize(net, sample=torch.randn(3, 64))
        >>> type(net[0]).__name__, report["layers_requantized"]
        ('Linear4bit', 1)
    """
    from ..model import _registry, adapted_layers, unload

    settings = {}
    for path, layer in adapted_layers(model):
        if layer.ops.quantized:
            base = layer.base
            settings[path] = (base.compute_dtype, base.blocksize, base.double_quant)
    if _registry(model) is None or not settings:
        raise ValueError("requantize() needs a model with lorakit adapters on 4-bit (Linear4bit) layers")

    def run() -> torch.Tensor | None:
        if sample is None:
            return None
        with torch.no_grad():
            out = model(**sample) if isinstance(sample, dict) else model(sample)
        out = getattr(out, "logits", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        return out.detach().float().clone()

    before = run()
    unload(model, merge=True)
    per_layer: dict[str, float] = {}
    swaps = []
    for path, (cd, bs, dq) in settings.items():
        dense = model.get_submodule(path)
        q = Linear4bit.from_linear(dense, cd, bs, dq)
        w = dense.weight.detach().float()
        per_layer[path] = float((q.dequantize(torch.float32) - w).norm() / w.norm().clamp(min=1e-30))
        swaps.append((path, q))
    for path, q in swaps:
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, q)
    after = run()
    report: dict[str, Any] = {"layers_requantized": len(swaps), "rel_weight_change": per_layer,
                              "max_rel_weight_change": max(per_layer.values())}
    text = (f"requantize(): the merged weights were rounded to NF4 again; {len(swaps)} layers changed by up to "
            f"{report['max_rel_weight_change']:.2%} (relative Frobenius norm)")
    if before is not None:
        diff = (after - before).abs()
        report["max_abs_output_change"] = float(diff.max())
        report["rel_output_change"] = float((after - before).norm() / before.norm().clamp(min=1e-30))
        text += (f"; model outputs changed by max |Δ| = {report['max_abs_output_change']:.4g} "
                 f"(relative {report['rel_output_change']:.2%})")
    else:
        text += "; pass sample=... to measure the output change"
    if warn:
        warnings.warn(text + ". lorakit.merge/unload without requantize keep the adapted function exactly.",
                      stacklevel=2)
    report["message"] = text
    return report


__all__ = ["Linear4bit", "quantize", "model_weight_bytes", "save_quantized", "load_quantized", "requantize",
           "COMPUTE_DTYPES"]
