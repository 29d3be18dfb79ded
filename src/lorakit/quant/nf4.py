"""NF4 block-wise quantisation with optional double quantisation, in pure PyTorch (CPU and GPU).

Storage follows bitsandbytes exactly (methods.md §13, §17), so codes, constants and dequantised values are
bit-identical to ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` / ``dequantize_4bit``:

* the tensor is flattened row-major and cut into blocks of ``blocksize`` (64) consecutive values; a final partial
  block gets its own constant;
* ``absmax_k = max |w|`` per block (fp32); values are scaled by the reciprocal, ``w · (1/absmax_k)``, clamped to
  [-1, 1] and rounded to the nearest of the 16 NF4 code values (a value on a midpoint goes to the lower code);
* two 4-bit codes per byte, the first element in the high nibble (odd lengths are padded with the code of 0.0);
* dequantisation looks the code up in fp32, multiplies by the fp32 constant, then casts to the requested dtype;
* double quantisation (``double_quant=True``): ``offset = mean(absmax)``; ``absmax − offset`` is quantised to 8 bits
  with bitsandbytes' signed dynamic (tree) map in blocks of 256, each with an fp32 absmax; the 8-bit step divides by
  the block absmax and picks the nearer of the two neighbouring map entries (the left one on a tie).

Bits per stored parameter: ``4 + 32/64 = 4.5`` without double quantisation and ``4 + 8/64 + 32/(64·256) ≈ 4.127``
with it (:func:`nf4_bits_per_parameter`).

Example:
    >>> import torch
    >>> w = torch.randn(8, 64)
    >>> q = quantize_nf4(w, double_quant=True)
    >>> dequantize_nf4(q).shape
    torch.Size([8, 64])
    >>> round(nf4_bits_per_parameter(64, double_quant=True), 3)
    4.127
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

#: The 16 NF4 values (sorted; index = 4-bit code), bitsandbytes' ``get_4bit_type("nf4")``.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: Block sizes bitsandbytes accepts for 4-bit quantisation.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Block size of the second (8-bit) level of double quantisation.
DQ_BLOCKSIZE = 256
#: Elements processed at once when quantising, to bound the temporary memory of large matrices.
_CHUNK = 1 << 22


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 code book as an fp32 tensor of 16 sorted values."""
    return _nf4_code(str(device)).clone()


@lru_cache(maxsize=None)
def _nf4_code(device: str) -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def normal_map(offset: float = 0.9677083) -> torch.Tensor:
    """Rebuild the NF4 table from its definition (methods.md §13): 8 positive and 7 negative normal quantiles plus
    an exact 0, sorted and scaled to [-1, 1]. Agrees with :data:`NF4_CODE_VALUES` to about 1e-7 (a check of the
    table, not used for quantisation)."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.sort(torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])).values
    return (values / values.max()).float()


@lru_cache(maxsize=None)
def _dynamic_map(device: str) -> torch.Tensor:
    # bitsandbytes' signed dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)):
    # for each decade 10^-6 .. 10^0, the midpoints of 2^i + 1 evenly spaced points on [0.1, 1], both signs; plus 0
    # and 1. Computed with the same fp32 steps so the 256 values are bit-identical.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-6 + i)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic (tree) map: 256 sorted fp32 values in [-0.993, 1]."""
    return _dynamic_map(str(device)).clone()


# ---------------------------------------------------------------------------------------------------------------
# 8-bit block-wise (second level of double quantisation)
# ---------------------------------------------------------------------------------------------------------------
#: Resolution of bitsandbytes' CPU 8-bit quantiser: [-1, 1] is cut into this many grid points, each mapped once to
#: its nearest code value (a lookup table instead of a per-value search).
_LUT_SIZE = 65536


@lru_cache(maxsize=None)
def _dynamic_lut(device: str) -> torch.Tensor:
    # Grid point i is -1 + 2i/65535 (fp32); its entry is the number of code midpoints strictly below it, i.e. the
    # nearest code with ties going down. Same fp32 steps as bitsandbytes' CPU kernel, so the table is identical.
    code = _dynamic_map(device)
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mids, grid, right=False).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 8-bit quantisation with the dynamic map: returns ``(codes uint8, absmax fp32)``.

    Bit-identical to bitsandbytes' CPU ``quantize_blockwise``: per block ``v = x · (1/absmax)``, then
    ``v`` is snapped to a grid of 65536 points on [-1, 1] (``round-half-up((v+1)/2 · 65535)``) and the grid
    point's nearest code is taken (ties to the lower code). So a value very close to a midpoint of the map may get the other neighbour than an exact nearest search (what
    bitsandbytes' CUDA kernel does); the difference is at most one step of the map. An all-zero block gets code 0
    and absmax 0 (dequantises to 0).

    Example:
        >>> q, amax = quantize_blockwise_8bit(torch.tensor([0.5, -1.0, 0.25]))
        >>> round(dequantize_blockwise_8bit(q, amax).tolist()[1], 5)  # the map's lowest value is -0.99297
        -0.99297
    """
    lut = _dynamic_lut(str(x.device))
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = 1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    v = (padded * inv[:, None]).clamp_(-1.0, 1.0)
    # fp32 steps as in the C kernel, then truncation like its cast to uint16 (whether the compiler fuses the
    # multiply-add made no difference on 5e7 random values, so the plain fp32 form is used)
    index = (((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).long()
    codes = lut[index]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


@torch.compiler.assume_constant_result
def _dynamic_map_constant(device: str) -> torch.Tensor:
    # torch.compile calls this once while tracing and keeps the table as a graph constant: building it (a Python
    # loop with .tolist()) cannot be traced, and it depends on nothing but the device
    return _dynamic_map(device)


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: ``code[q] · absmax`` in fp32."""
    code = _dynamic_map_constant(str(q.device))
    n = q.numel()
    values = code[q.reshape(-1).long()]
    nblocks = absmax.numel()
    values = torch.nn.functional.pad(values, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------------------------
# NF4
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class NF4Tensor:
    """A tensor stored in NF4: packed codes plus block constants (plain tensors, safetensors-friendly).

    ``absmax`` is fp32 ``[blocks]`` without double quantisation; with it, ``absmax`` holds uint8 codes and
    ``absmax2`` (fp32 ``[ceil(blocks/256)]``) and ``offset`` (fp32 scalar) the second level.
    """

    packed: torch.Tensor  # uint8 [ceil(numel/2)]
    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_constants(self) -> torch.Tensor:
        """The fp32 absmax of every block (double quantisation undone)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.absmax2, DQ_BLOCKSIZE) + self.offset

    def nbytes(self) -> int:
        """Bytes held by the packed codes and all constants."""
        tensors = [self.packed, self.absmax, self.absmax2, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def bits_per_parameter(self) -> float:
        """Stored bits per original value (codes + constants)."""
        return 8.0 * self.nbytes() / max(self.numel, 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense tensor in ``dtype`` (see :func:`dequantize_nf4`)."""
        return dequantize_nf4(self, dtype)


def check_blocksize(blocksize: int) -> None:
    """Raise ValueError unless ``blocksize`` is one bitsandbytes' NF4 supports (:data:`BLOCKSIZES`).

    Example:
        >>> check_blocksize(64)
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is invalid; allowed: {', '.join(map(str, BLOCKSIZES))}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantise a float tensor (fp32/bf16/fp16) to NF4, bit-identical to bitsandbytes' ``quantize_4bit``.

    Example:
        >>> q = quantize_nf4(torch.tensor([[1.0, -0.5, 0.0, 0.25]]), blocksize=64)
        >>> q.packed.tolist(), q.absmax.tolist()
        ([[242], [122]], [1.0])

    (Codes 15, 2 | 7, 10: ``0.25`` is nearest to 0.2461; packed as ``[ceil(n/2), 1]`` like bitsandbytes.)
    """
    check_blocksize(blocksize)
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_nf4 needs an fp32/bf16/fp16 tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    code = _nf4_code(str(w.device))
    bounds = (code[:-1] + code[1:]) / 2  # midpoints; searchsorted(right=False) sends ties to the lower code
    flat = w.detach().reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    full = (n // blocksize) * blocksize
    absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    codes = torch.empty(n + (n % 2), dtype=torch.uint8, device=w.device)
    step = max(_CHUNK // blocksize, 1) * blocksize
    for start in range(0, full, step):  # full blocks: scale by the reciprocal of the block absmax
        stop = min(start + step, full)
        blocks = flat[start:stop].float().view(-1, blocksize)
        amax = blocks.abs().amax(dim=1)
        absmax[start // blocksize: stop // blocksize] = amax
        scaled = (blocks * (1.0 / amax.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
        codes[start:stop] = torch.searchsorted(bounds, scaled.reshape(-1)).to(torch.uint8)
    if full < n:  # the final partial block: a true division, as bitsandbytes does
        tail = flat[full:].float()
        amax = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = amax
        codes[full:n] = torch.searchsorted(bounds, (tail / amax).clamp(-1, 1)).to(torch.uint8)
    if n % 2:
        codes[n] = 7  # padding nibble: the code of 0.0
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    if not double_quant:
        return NF4Tensor(packed, absmax, tuple(w.shape), blocksize)
    offset = absmax.mean()
    q, absmax2 = quantize_blockwise_8bit(absmax - offset, DQ_BLOCKSIZE)
    return NF4Tensor(packed, q, tuple(w.shape), blocksize, absmax2, offset)


@lru_cache(maxsize=None)
def _byte_table(device: str) -> torch.Tensor:
    # the code values of both nibbles of every byte, bit-packed as one int64 per byte: a single 1-D gather unpacks
    # two codes (measured ~3x faster on CPU than shifting, masking and indexing the 16-entry table)
    code = _nf4_code(device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous().view(torch.int64).view(-1)


@torch.compiler.assume_constant_result
def _byte_table_constant(device: str) -> torch.Tensor:
    # under torch.compile: built once while tracing and kept as a graph constant, not rebuilt in every forward
    return _byte_table(device)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense tensor from :class:`NF4Tensor`: ``code[idx] · absmax`` in fp32, then cast to ``dtype``.

    Example:
        >>> w = torch.randn(4, 64)
        >>> bool((dequantize_nf4(quantize_nf4(w)) - w).abs().max() < 0.5)
        True
    """
    return dequantize_parts(q.packed, q.block_constants(), q.shape, q.blocksize, dtype)


def dequantize_parts(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], blocksize: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Dequantise packed NF4 codes with fp32 block constants ``absmax`` to a ``shape`` tensor in ``dtype``."""
    n = math.prod(shape)
    index = packed.reshape(-1).to(torch.int32)
    values = _byte_table_constant(str(packed.device)).index_select(0, index).view(torch.float32)
    nblocks = absmax.numel()
    if values.numel() != nblocks * blocksize:
        values = torch.nn.functional.pad(values[:n], (0, nblocks * blocksize - n))
    out = values.view(nblocks, blocksize).mul_(absmax.view(-1, 1)).view(-1)
    if out.numel() != n:
        out = out[:n]
    return out.view(shape).to(dtype)


def nf4_bits_per_parameter(blocksize: int = 64, double_quant: bool = True) -> float:
    """Asymptotic stored bits per parameter: 4 bits of code plus the block constants.

    ``4 + 32/blocksize`` without double quantisation (4.5 at block 64); ``4 + 8/blocksize +
    32/(blocksize·256)`` with it (≈ 4.127 at block 64; the one fp32 offset per tensor is negligible).

    Example:
        >>> nf4_bits_per_parameter(64, double_quant=False)
        4.5
    """
    check_blocksize(blocksize)
    if not double_quant:
        return 4.0 + 32.0 / blocksize
    return 4.0 + 8.0 / blocksize + 32.0 / (blocksize * DQ_BLOCKSIZE)
