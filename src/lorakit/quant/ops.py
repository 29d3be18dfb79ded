"""How a 4-bit base looks to the methods: a read-only ``[out, in]`` matrix dequantised on demand."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LayerOps


class Linear4bitOps(LayerOps):
    """LayerOps for :class:`~lorakit.quant.linear4bit.Linear4bit`: dequantises on demand, never keeps a dense copy."""

    kind = "linear"
    quantized = True

    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - methods use weight_matrix()
        return self.base.dequantize()

    def weight_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.base.dequantize(dtype or self.base.compute_dtype)

    def set_weight_matrix(self, matrix: torch.Tensor) -> None:
        self.base.requantize_(matrix)

    def base_forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.base.compute_dtype
        return F.linear(x.to(cd), self.base.dequantize(cd))

    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def adapter_dtype(self) -> torch.dtype:
        cd = self.base.compute_dtype
        return torch.float32 if cd in (torch.float16, torch.bfloat16) else cd

    def densify(self) -> nn.Module:
        """A plain ``nn.Linear`` in the compute dtype with the dequantised weight (exact)."""
        return self.base.to_linear()
