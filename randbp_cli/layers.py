"""Randomized linear layers: exact forward, sketched weight gradient (METHOD §1).

Trade-off: a plain `nn.Linear` keeps its whole input X (N × d_in, N = all leading dims) alive
until backward, only to form dW = Yᵀ X. `RandomizedLinear` keeps a sketch Sᵀ X (k × d_in,
k = round(ρ·N) clamped to [min_rows, N]) instead, and forms the unbiased estimate
dW ≈ (Sᵀ Y)ᵀ (Sᵀ X) in backward.

What is saved for backward, exactly (through `ctx.save_for_backward`, so saved-tensor hooks
see all of it):
  * the sketch Sᵀ X, plus any index tensors a data-dependent sketch needs;
  * the weight (a parameter, kept alive by the model anyway) when an input gradient is needed.
What is *not* saved: X, and S itself. S is regenerated in backward from a 63-bit seed kept
as a plain integer. The seed is drawn afresh for every call from torch's global RNG, so two
calls never share S by accident and `torch.manual_seed` reproduces a run bit for bit.

What is exact: the output, ∂L/∂X = Y W and ∂L/∂b = Σ rows of Y (the same as `nn.Linear`).
Only ∂L/∂W is randomized.

Caveats:
  * Nothing is sketched or saved when no weight gradient is needed (`torch.no_grad()`,
    `requires_grad=False` weights): the layer then runs exactly like `nn.Linear`. A layer in
    training mode with a trainable weight still draws its seed under `no_grad`, so that
    activation checkpointing (a no-grad forward, then a recompute in backward from the same
    RNG state) sees the same dropout masks and the same sketches in both passes.
  * Under `torch.autocast`, inputs are cast to the autocast dtype first, and the sketch is
    built and stored in that dtype (like the half-precision copy autocast would have saved).
  * Layers that read the same input tensor (Q, K and V of an attention block) share one
    sketch of it (same seed, same stored tensor), so that input costs ρ of itself once, not
    3ρ (METHOD §4.7). The shared sketch is kept on the input tensor and dies with it; it is
    reused only while the tensor is unmodified and only by layers that have not used it yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .sketches import Sketch, check_rho, get_sketch, sketch_rows

_SHARED_ATTR = "_randbp_shared_sketches"
_AUTOCAST_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def draw_seed() -> int:
    """A fresh 62-bit seed from torch's global (CPU) RNG; no device synchronisation."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


@dataclass(frozen=True)
class SketchPlan:
    """How one call sketches its input. `owner` identifies the layer for sharing."""

    sketch: Sketch
    rho: float
    min_rows: int = 1
    share: bool = True
    owner: int = 0


@dataclass
class _SharedSketch:
    """A sketch other layers reading the same input may reuse.

    NOTE: held strongly, on the input tensor. Weak references would die as soon as a saved-
    tensor hook (memory accounting, CPU offload) stores a copy instead of the object itself.
    The cost is that the sketch (ρ of the input) lives as long as the input does.
    """

    version: int
    k: int
    seed: int
    saved: tuple[Tensor, ...]
    users: set[int] = field(default_factory=set)


def _sketch_input(anchor: Tensor, x2: Tensor, k: int, plan: SketchPlan) -> tuple[int, tuple[Tensor, ...]]:
    """Seed and saved tensors for this call: reuse the anchor's sketch if another layer made it."""
    if not plan.share:
        seed = draw_seed()
        return seed, plan.sketch.compress(x2, k, seed)
    key = (plan.sketch.name, k, x2.dtype)
    cache: dict = getattr(anchor, _SHARED_ATTR, None) or {}
    entry = cache.get(key)
    if entry is not None and entry.version == anchor._version and plan.owner not in entry.users:
        entry.users.add(plan.owner)
        return entry.seed, entry.saved
    seed = draw_seed()
    saved = plan.sketch.compress(x2, k, seed)
    cache[key] = _SharedSketch(anchor._version, k, seed, saved, {plan.owner})
    setattr(anchor, _SHARED_ATTR, cache)
    return seed, saved


def _draw_as_a_sketch_would(anchor: Tensor, n_rows: int, plan: SketchPlan) -> None:
    """Consume the RNG exactly as the grad-enabled call would, without sketching anything.

    NOTE: activation checkpointing runs a training forward under no_grad, then restores the
    RNG state and recomputes with grad in backward. If the first pass drew no sketch seeds but
    the recompute did, every later dropout mask in the recompute would differ from the one
    the loss was computed with. Drawing the same seeds (shared ones once, like the real
    pass) keeps both passes on one RNG stream, so the recompute is faithful and its sketch
    seeds equal those of a run without checkpointing.
    """
    k = sketch_rows(n_rows, plan.rho, plan.min_rows)
    if k == 0:
        return
    if not plan.share:
        draw_seed()
        return
    key = ("rng-only", plan.sketch.name, k)
    cache: dict = getattr(anchor, _SHARED_ATTR, None) or {}
    entry = cache.get(key)
    if entry is not None and entry.version == anchor._version and plan.owner not in entry.users:
        entry.users.add(plan.owner)
        return
    cache[key] = _SharedSketch(anchor._version, k, draw_seed(), (), {plan.owner})
    setattr(anchor, _SHARED_ATTR, cache)


class RandomizedLinearFunction(torch.autograd.Function):
    """out = x Wᵀ + b; backward: exact dX and db, dW = (Sᵀ dY)ᵀ (Sᵀ X)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: SketchPlan, anchor: tuple[Tensor]):
        out = F.linear(x, weight, bias)
        ctx.plan = plan
        ctx.k = 0
        ctx.in_features = x.shape[-1]
        keep_weight = weight if ctx.needs_input_grad[0] else None
        saved: tuple[Tensor, ...] = ()
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
            ctx.k = sketch_rows(x2.shape[0], plan.rho, plan.min_rows)
            if ctx.k > 0:
                ctx.seed, saved = _sketch_input(anchor[0], x2, ctx.k, plan)
        ctx.save_for_backward(keep_weight, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, *saved = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = grad_out.matmul(weight)
            y2 = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
            if ctx.needs_input_grad[1]:
                if ctx.k == 0:  # no rows at all (N = 0): the exact gradient is zero
                    grad_w = grad_out.new_zeros(grad_out.shape[-1], ctx.in_features)
                else:
                    sketched_y = ctx.plan.sketch.compress_grad(y2, ctx.k, ctx.seed, tuple(saved))
                    grad_w = sketched_y.T.mm(saved[0])  # (d_out, k) @ (k, d_in)
            if ctx.needs_input_grad[2]:
                grad_b = y2.sum(0)
        return grad_x, grad_w, grad_b, None, None


def randomized_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, rho: float = 0.5,
                      sketch: str | Sketch = "gaussian", min_rows: int = 1, share: bool = True,
                      owner: int = 0, training: bool = False) -> Tensor:
    """Functional form of `RandomizedLinear`: same output as `F.linear(x, weight, bias)`.

    `training=True` marks a training forward: run under no_grad (checkpointing's first pass),
    it still draws the seeds it would sketch with, so the RNG stream matches the recompute.
    """
    if not (torch.is_grad_enabled() and weight.requires_grad):
        if training and weight.requires_grad and x.dim() > 0:
            plan = SketchPlan(get_sketch(sketch), check_rho(rho), _check_min_rows(min_rows), share, owner)
            _draw_as_a_sketch_would(x, x.numel() // max(x.shape[-1], 1), plan)
        return F.linear(x, weight, bias)  # no weight gradient: nothing to sketch (METHOD §4.3)
    plan = SketchPlan(get_sketch(sketch), check_rho(rho), _check_min_rows(min_rows), share, owner)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype in _AUTOCAST_INPUT_DTYPES:
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return RandomizedLinearFunction.apply(
                x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), plan, (x,)
            )
    return RandomizedLinearFunction.apply(x, weight, bias, plan, (x,))


def _check_min_rows(min_rows: int) -> int:
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ConfigError(f"min_rows must be an integer >= 1 (got {min_rows!r})")
    return min_rows


class RandomizedLinear(nn.Linear):
    """Drop-in `nn.Linear` whose weight gradient is estimated from a sketch of its input.

    Args: as `nn.Linear`, plus
        rho: compression rate in (0, 1]; the sketch keeps k = round(ρ·N) of N token rows.
        sketch: a name from `randbp_cli.sketches.sketch_names()` or a `Sketch` instance.
        min_rows: lower clamp on k (k never exceeds N).
        share_sketch: share one sketch with other layers reading the same input tensor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rho: float = 0.5,
                 sketch: str | Sketch = "gaussian", min_rows: int = 1, share_sketch: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.configure(rho=rho, sketch=sketch, min_rows=min_rows, share_sketch=share_sketch)

    def configure(self, *, rho: float, sketch: str | Sketch = "gaussian", min_rows: int = 1,
                  share_sketch: bool = True) -> "RandomizedLinear":
        self.rho = check_rho(rho)
        self.sketch = get_sketch(sketch)
        self.min_rows = _check_min_rows(min_rows)
        self.share_sketch = bool(share_sketch)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rho: float, sketch: str | Sketch = "gaussian",
                    min_rows: int = 1, share_sketch: bool = True) -> "RandomizedLinear":
        """A RandomizedLinear holding the *same* Parameter objects as `linear` (no copies)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)
        layer.train(linear.training)
        return layer.configure(rho=rho, sketch=sketch, min_rows=min_rows, share_sketch=share_sketch)

    def forward(self, x: Tensor) -> Tensor:
        return randomized_linear(x, self.weight, self.bias, rho=self.rho, sketch=self.sketch,
                                 min_rows=self.min_rows, share=self.share_sketch, owner=id(self),
                                 training=self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rho={self.rho}, sketch={self.sketch.name}"
