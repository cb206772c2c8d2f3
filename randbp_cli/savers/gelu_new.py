"""GPT-2's GELU (transformers' `gelu_new`) as one op: its input kept, not four tensors (exact).

transformers writes the tanh approximation of GELU out in Python for GPT-2 and its kin
(`NewGELUActivation`, activation "gelu_new"; `FastGELUActivation`, "gelu_fast", the same function
with the constant rounded; `GELUTanh(use_gelu_tanh_python=True)`, "gelu_python_tanh"):

    0.5 * x * (1 + tanh(√(2/π) · (x + 0.044715 · x³)))

Run as written, autograd keeps four d_ff-wide tensors per token until backward: x (for the
cube), the tanh's output, 0.5·x and 1 + tanh (the last product's two factors). `TanhGELU`
computes the same function with torch's fused `F.gelu(x, approximate="tanh")`, which keeps x
only and forms the derivative from it in backward: three d_ff tensors per token and layer less.

What is saved for backward: the input x, as it is (filed as `gelu_inputs`). What is exact: the
output and the gradient are the same function and its derivative, up to rounding (one fused
kernel instead of eight ops; `FastGELUActivation`'s constant differs from √(2/π) below float32's
resolution). Second-order gradients flow (torch's gelu backward is differentiable).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

SAVED_KIND = "gelu_inputs"
# transformers' activation classes whose forward writes out 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
# (read in transformers 5.2x)
VERIFIED_GELUS = ("NewGELUActivation", "FastGELUActivation")


def is_written_out_tanh_gelu(module: nn.Module) -> bool:
    """A verified transformers class, its forward its own (not one a kernel hub put on the instance)."""
    cls = type(module)
    if cls.__module__ != "transformers.activations" or "forward" in vars(module):
        return False
    if cls.__name__ == "GELUTanh":  # written out only with use_gelu_tanh_python=True
        return getattr(getattr(module, "act", None), "__func__", None) is cls._gelu_tanh_python
    return cls.__name__ in VERIFIED_GELUS


class TanhGELU(nn.Module):
    """Stands in for a written-out tanh GELU: `F.gelu(x, approximate="tanh")`, the input kept."""

    saved_kind = SAVED_KIND

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")
