"""How much noise randomized backprop adds, next to the noise SGD already has (docs/method.md §2–3).

For one linear layer on one batch, X (N × d_in) is its input and Y = ∂L/∂out (N × d_out), with
N the number of rows the layer sees (all leading dims flattened: tokens, padding included).
Per-row gradients are gᵢ = yᵢxᵢᵀ and the exact weight gradient is G = YᵀX (the transpose of
XᵀY; the same norm). Padding rows have yᵢ = 0 (nothing downstream reads them), so they are no
SGD samples: the mini-batch statistics run over the B real (non-padding) token rows, while
the sketch, which cannot tell them apart, sees all N rows. We report

  α        = ‖XᵀY‖² / (‖X‖²‖Y‖²) ∈ [0, 1]            over the B real rows
  D²_SGD   = (B·Σᵢ‖xᵢ‖²‖yᵢ‖² − ‖XᵀY‖²) / (B − 1)      mini-batch (row-sampling) variance, real rows
  D²_RMM   = E‖(SᵀY)ᵀ(SᵀX) − G‖²_F over all N rows, k = round(ρ·N): measured by applying the
             sketch `repeats` times to the same X and Y (mean and its standard error), and from
             the sketch's closed form (padding rows add to it: their xᵢ collide with real yⱼ)
  ratio    = (k / (B − 1)) · D²_RMM / D²_SGD  (measured; `ratio_theory` from the closed form)
  bound    = (α + 1) / α                       (the paper's Theorem 1 upper bound, for Gaussian)

`capture_linear_io` records X and Y of chosen layers for one forward/backward only, so the
measurement costs memory only on measured steps and only for the layers asked for. The command
that trains and measures is commands/variance.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.layers import draw_seed
from ..core.sketches import Sketch, get_sketch
from ..errors import ConfigError


@dataclass
class GradientStats:
    rows: int
    grad_norm: float
    alpha: float
    d2_sgd: float


def gradient_stats(x: Tensor, y: Tensor, real: Tensor | None = None) -> GradientStats:
    """‖XᵀY‖, α and D²_SGD in float64 (docs/method.md §3), over the rows `real` marks (all by default)."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    if real is not None:
        x, y = x[real], y[real]
    rows = x.shape[0]
    if rows < 2:
        raise ConfigError("a batch of one row has no mini-batch variance (B − 1 = 0): use a larger batch")
    row_x, row_y = x.square().sum(1), y.square().sum(1)
    grad_sq = float((x.T @ y).square().sum())
    x_sq, y_sq = float(row_x.sum()), float(row_y.sum())
    alpha = grad_sq / (x_sq * y_sq) if x_sq * y_sq > 0 else 0.0
    d2_sgd = (rows * float((row_x * row_y).sum()) - grad_sq) / (rows - 1)
    return GradientStats(rows, math.sqrt(grad_sq), alpha, d2_sgd)


def measure_rmm_variance(x: Tensor, y: Tensor, sketch: str | Sketch, k: int, repeats: int,
                         generator_seed: int | None = None) -> tuple[float, float]:
    """Mean and standard error of ‖(SᵀY)ᵀ(SᵀX) − G‖²_F over `repeats` fresh sketches."""
    if repeats < 2:
        raise ConfigError(f"--repeats must be at least 2 to give a standard error (got {repeats})")
    sketch = get_sketch(sketch)
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    # measure in float32 at least: half precision would add rounding noise to the variance
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    exact = y.T @ x
    gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    errors = torch.empty(repeats, dtype=torch.float64)
    for r in range(repeats):
        seed = int(torch.randint(0, 2**62, (), generator=gen).item()) if gen is not None else draw_seed()
        saved = sketch.compress(x, k, seed)
        estimate = sketch.compress_grad(y, k, seed, saved).T @ saved[0]
        errors[r] = float((estimate - exact).double().square().sum())
    return float(errors.mean()), float(errors.std() / math.sqrt(repeats))


@contextmanager
def capture_linear_io(model: nn.Module, layers: Iterable[str]):
    """Record (X, Y) of each named module during one forward/backward: yields {name: [X, Y]}."""
    captured: dict[str, list[Tensor | None]] = {}
    handles = []

    def hook(name):
        def forward_hook(module, inputs, output):
            captured[name] = [inputs[0].detach(), None]
            if output.requires_grad:
                output.register_hook(lambda grad: captured[name].__setitem__(1, grad.detach()))
        return forward_hook

    for name in layers:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def real_rows(x: Tensor, batch: dict) -> Tensor | None:
    """Which of x's rows are real tokens: the attention mask, when x has one row per token."""
    mask = batch.get("attention_mask")
    if mask is None or tuple(x.shape[:-1]) != tuple(mask.shape):
        return None  # pooled or otherwise per-example rows: all real
    return mask.reshape(-1).bool()
