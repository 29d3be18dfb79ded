"""8-bit AdamW in pure PyTorch: block-wise quantised moments, fp32 update math (runs on any device).

The two Adam moments are stored as one byte per element plus one fp32 scale per block, the scheme bitsandbytes uses
for its 8-bit optimisers (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2021):

* the tensor is flattened row-major and cut into blocks of ``block_size`` elements (256 by default, as bitsandbytes;
  2048 was its older block size); each block stores ``absmax = max|x|`` in fp32;
* ``x / absmax`` is rounded to the nearest entry of a 256-entry code book: bitsandbytes' *dynamic* map (a
  dynamic-exponent 8-bit format covering about seven orders of magnitude) — the signed map for the first moment
  ``m``, the unsigned map for the second moment ``v`` (which is never negative, so all 256 codes cover ``[0, 1]``);
* every step dequantises ``m`` and ``v`` to fp32, applies the AdamW update in fp32 (also to bf16/fp16 parameters,
  which are updated through an fp32 copy), and quantises the new moments with fresh block scales.

Tensors with fewer than ``min_8bit_size`` elements (4096, bitsandbytes' default) keep fp32 moments: their state is
tiny and 8-bit rounding would cost accuracy for nothing. A parameter group can force fp32 state with
``"optim_bits": 32`` (``lorakit.make_optimizer`` does this for ``nn.Embedding`` weights, as bitsandbytes advises).

State per 8-bit parameter: ``step``, ``exp_avg_q``/``exp_avg_sq_q`` (uint8, the parameter's shape) and
``exp_avg_absmax``/``exp_avg_sq_absmax`` (fp32, one per block): ``2 + 8/block_size`` bytes per element instead of
fp32 AdamW's 8, i.e. about 0.25x. The code books are not stored in the state (they are constants).

Example:
    >>> import torch
    >>> from lorakit.quant.adamw8bit import AdamW8bit
    >>> w = torch.nn.Parameter(torch.randn(64, 128))
    >>> opt = AdamW8bit([w], lr=1e-3)
    >>> w.grad = torch.randn_like(w)
    >>> opt.step()
    >>> opt.state[w]["exp_avg_q"].dtype, opt.state[w]["exp_avg_absmax"].shape
    (torch.uint8, torch.Size([32]))
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

__all__ = ["AdamW8bit", "dynamic_map", "quantize_blockwise", "dequantize_blockwise", "state_bytes"]

_MAPS: dict[tuple[bool, str], torch.Tensor] = {}  # code books per (signed, device)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code book (``create_dynamic_map(signed, 7, 8)``): 256 sorted fp32 values in [-1, 1].

    Each exponent ``e = 0..6`` contributes the midpoints of an even split of ``[0.1, 1]`` scaled by ``10^(e-6)``;
    the number of splits doubles with ``e`` (the bits not spent on the exponent go to the fraction). The signed map
    mirrors every value (127 positive, 127 negative); the unsigned map uses the sign bit for one more fraction bit
    (254 positive values). Both add exact 0 and 1.

    Example:
        >>> m = dynamic_map(signed=False)
        >>> m.shape, float(m[0]), float(m[-1])
        (torch.Size([256]), 0.0, 1.0)
    """
    values: list[torch.Tensor] = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        # signed: 2^e fraction values per sign; unsigned: twice as many, all positive
        n_values = 2 ** e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1, n_values + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (e - 6)) * mids
        values.append(scaled)
        if signed:
            values.append(-(10 ** (e - 6)) * mids)
    table = torch.cat(values)
    assert table.numel() == 256
    return torch.sort(table).values


def _code(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _MAPS:
        _MAPS[key] = dynamic_map(signed).to(device)
    return _MAPS[key]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantisation of ``x`` to indices into ``code`` (sorted, 256 entries).

    Returns ``(codes, absmax)``: uint8 codes shaped like ``x`` and one fp32 ``max|x|`` per block of the flattened
    tensor (the last block may be partial). Values go to the nearest code entry (ties to the lower one).

    Example:
        >>> x = torch.tensor([0.5, -1.0, 0.0, 2.0])
        >>> q, absmax = quantize_blockwise(x, dynamic_map(True), block_size=2)
        >>> absmax.tolist()
        [1.0, 2.0]
        >>> [round(v, 4) for v in dequantize_blockwise(q, absmax, dynamic_map(True), block_size=2).tolist()]
        [0.5008, -0.993, 0.0, 2.0]
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))  # zeros never change a block's absmax
    blocks = flat.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    # multiply by the reciprocal as bitsandbytes does; an all-zero block keeps scale 0 (its codes are 0's index)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    idx = _nearest(scaled.reshape(-1)[:n], code)
    return idx.reshape(x.shape), absmax


# Nearest code entry = number of midpoints (between adjacent entries) below the value. torch.bucketize does that
# with a binary search per element, which is slow on CPU (~8 dependent steps); instead the top bits of the value's
# order-preserving integer key pick a bucket of a lookup table fine enough to hold at most one midpoint, so one
# gather and one comparison give the same answer (checked when the table is built; otherwise bucketize is used).
_KEY_SHIFT = 15  # 2^17 buckets; each spans < 0.4% of its value, finer than the dynamic maps' spacing (>= 0.7%)
_LUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]] = {}


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the fp32 values (negative floats have their magnitude bits flipped)."""
    bits = x.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # arithmetic shift: all ones for negatives, zero otherwise


def _lookup_table(code: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    key = (code.data_ptr(), code._version, str(code.device))
    hit = _LUTS.get(key)
    if hit is not None and hit[0] is code:
        return hit[1], hit[2], hit[3]
    mids = ((code[1:] + code[:-1]) / 2).float()
    n_buckets = 1 << (32 - _KEY_SHIFT)
    bucket = (_order_key(mids) >> _KEY_SHIFT).long() + n_buckets // 2
    base = mid = None
    if code.numel() <= 256 and torch.unique(bucket).numel() == mids.numel():  # <= 1 midpoint per bucket
        counts = torch.bincount(bucket, minlength=n_buckets)
        base = (torch.cumsum(counts, 0) - counts).to(torch.uint8)  # midpoints in earlier buckets (0..255)
        mid = torch.full((n_buckets,), float("inf"), device=code.device)
        mid[bucket] = mids
    if len(_LUTS) > 16:  # code books are few; drop stale entries of freed tensors
        _LUTS.clear()
    _LUTS[key] = (code, base, mid, mids)
    return base, mid, mids


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest entry of sorted ``code`` for each fp32 value (ties to the lower entry)."""
    base, mid, mids = _lookup_table(code)
    if base is None:
        return torch.bucketize(values, mids).to(torch.uint8)
    bucket = (_order_key(values) >> _KEY_SHIFT) + (1 << (31 - _KEY_SHIFT))
    bucket = bucket.reshape(-1)
    idx = base.index_select(0, bucket)
    idx += values.reshape(-1) > mid.index_select(0, bucket)
    return idx


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         block_size: int = 256) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax`` per block, in fp32, shaped like ``codes``."""
    flat = code.index_select(0, codes.reshape(-1).to(torch.int32))
    n = flat.numel()
    n_blocks = absmax.numel()
    pad = n_blocks * block_size - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.view(n_blocks, block_size) * absmax[:, None]).reshape(-1)[:n].reshape(codes.shape)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimiser's state tensors (every tensor in ``optimizer.state``, shared ones counted once).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(64, 128)); w.grad = torch.ones_like(w)
        >>> opt = AdamW8bit([w]); opt.step()
        >>> state_bytes(opt)  # 2 x 8192 codes + 2 x 32 fp32 block scales
        16640
    """
    seen: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                seen[id(value)] = value.numel() * value.element_size()
    return sum(seen.values())


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"AdamW8bit: {name}={value!r} is invalid; it must be a finite number {bound}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with block-wise 8-bit moments (see the module docstring); the update itself is torch's AdamW in fp32.

    Args:
        params: parameters or parameter groups (groups may override any option below, and ``optim_bits``: 32
            keeps that group's moments in fp32).
        lr, betas, eps, weight_decay: as :class:`torch.optim.AdamW` (decoupled decay ``p *= 1 - lr·wd``).
        block_size: elements per quantisation block, a power of two in 64..4096 (256 as bitsandbytes).
        min_8bit_size: tensors with fewer elements keep fp32 moments (4096 as bitsandbytes).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(128, 64)
        >>> opt = AdamW8bit(net.parameters(), lr=1e-2)
        >>> loss = net(torch.randn(8, 128)).pow(2).mean(); loss.backward(); opt.step()
        >>> sorted(opt.state[net.weight]), sorted(opt.state[net.bias])  # the 64-element bias stays fp32
        (['exp_avg_absmax', 'exp_avg_q', 'exp_avg_sq_absmax', 'exp_avg_sq_q', 'step'], ['exp_avg', 'exp_avg_sq', 'step'])
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, block_size: int = 256, min_8bit_size: int = 4096):
        _check_positive("lr", lr, allow_zero=True)
        _check_positive("eps", eps, allow_zero=True)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"AdamW8bit: betas={betas!r} is invalid; give two numbers in [0, 1), e.g. (0.9, 0.999)")
        if not isinstance(block_size, int) or block_size < 64 or block_size > 4096 or block_size & (block_size - 1):
            raise ValueError(f"AdamW8bit: block_size={block_size!r} is invalid; use a power of two in 64..4096 "
                             "(256 as bitsandbytes, or 2048)")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"AdamW8bit: min_8bit_size={min_8bit_size!r} is invalid; give an int >= 0 (default 4096)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size, optim_bits=8)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["optim_bits"] not in (8, 32):
                raise ValueError(f"AdamW8bit: a parameter group has optim_bits={group['optim_bits']!r}; use 8 or 32")
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError("AdamW8bit: complex parameters are not supported; use torch.optim.AdamW")
                if hasattr(p, "device_mesh"):  # its block layout would follow the shards, not the full tensor
                    raise ValueError("AdamW8bit: FSDP-sharded (DTensor) parameters are not supported; use "
                                     "optimizer 'adamw' with FSDP, or DDP with 'adamw8bit'")

    # -- state ------------------------------------------------------------------------------------------------
    @staticmethod
    def _uses_8bit(p: torch.Tensor, group: dict) -> bool:
        return group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = 0
        if self._uses_8bit(p, group):
            n_blocks = -(-p.numel() // group["block_size"])
            # zero moments: index of the code value 0 in each map, scale 0
            state["exp_avg_q"] = torch.full(p.shape, int(torch.argmin(_code(True, p.device).abs())),
                                            dtype=torch.uint8, device=p.device)
            state["exp_avg_absmax"] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
            state["exp_avg_sq_q"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)  # unsigned map: 0 first
            state["exp_avg_sq_absmax"] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One AdamW step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, block = group["lr"], group["eps"], group["weight_decay"], group["block_size"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                state["step"] += 1
                step = state["step"]
                quantised = "exp_avg_q" in state
                if quantised:
                    m = dequantize_blockwise(state["exp_avg_q"], state["exp_avg_absmax"], _code(True, p.device), block)
                    v = dequantize_blockwise(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"],
                                             _code(False, p.device), block)
                else:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                grad = p.grad.float()
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias1 = 1.0 - beta1 ** step
                bias2 = 1.0 - beta2 ** step
                denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                p32 = p.float() if p.dtype != torch.float32 else p  # fp32 math for low-precision parameters too
                if wd != 0:
                    p32.mul_(1.0 - lr * wd)
                p32.addcdiv_(m, denom, value=-lr / bias1)
                if p32 is not p:
                    p.copy_(p32)
                if quantised:
                    q, s = quantize_blockwise(m, _code(True, p.device), block)
                    state["exp_avg_q"].copy_(q)
                    state["exp_avg_absmax"].copy_(s)
                    q, s = quantize_blockwise(v, _code(False, p.device), block)
                    state["exp_avg_sq_q"].copy_(q)
                    state["exp_avg_sq_absmax"].copy_(s)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, keeping the saved dtypes (uint8 codes, fp32 scales/moments).

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype, which would turn the
        codes into floats and round fp32 scales to bf16 for bf16 parameters; the saved tensors are put back as saved.
        """
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        keep = {}
        for pid, p in zip(saved_ids, params):
            if pid in saved_state:
                keep[p] = {k: v for k, v in saved_state[pid].items() if torch.is_tensor(v)}
        super().load_state_dict(state_dict)  # validates group sizes, restores hyper-parameters
        for p, tensors in keep.items():
            for key, value in tensors.items():
                self.state[p][key] = value.detach().to(device=p.device, copy=True)
        for group in self.param_groups:
            group["betas"] = tuple(group["betas"])  # JSON checkpoints turn tuples into lists
