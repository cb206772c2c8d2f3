"""Randomized linear layers: exact forward, sketched weight gradient (docs/method.md §1).

Trade-off: a plain `nn.Linear` keeps its whole input X (N × d_in, N = all leading dims) alive
until backward, only to form dW = Yᵀ X. `RandomizedLinear` keeps a sketch Sᵀ X (k × d_in,
k = round(ρ·N) clamped to [min_rows, N]) instead, and forms the unbiased estimate
dW ≈ (Sᵀ Y)ᵀ (Sᵀ X) in backward.

What is saved for backward, exactly (through `ctx.save_for_backward`, so saved-tensor hooks
see all of it):
  * the sketch Sᵀ X, plus any index tensors a data-dependent sketch needs;
  * the weight (a parameter, kept alive by the model anyway) when an input gradient is needed.
What is *not* saved: X, and S itself. S is regenerated in backward from the seed drawn for
this call from torch's RNG, so two calls never share S by accident and `torch.manual_seed`
reproduces a run bit for bit. One custom op (ops.py) draws the seed and makes Sᵀ X in the same
call, and returns both: then no compiler can give the backward a seed of its own (ops.py says
why that matters). The seed is an 8-byte int64 tensor; in eager mode it sits on the autograd
context, out of the saved-tensor accounting, so the reported bytes are the sketch's; a traced
graph needs every tensor its backward reads saved, so there it is saved.

What is exact: the output, ∂L/∂X = Y W and ∂L/∂b = Σ rows of Y (the same as `nn.Linear`).
Only ∂L/∂W is randomized. Second-order gradients (second_order.py): the sketch Sᵀ X is an
output of the autograd node, so ∂(dW)/∂X flows back through S (S·g, `ops.sketch_transpose`),
and Sᵀ dY is a differentiable op; both are linear in the data given S, so derivatives of dW
with respect to inputs and to other layers' weights are unbiased. A derivative of dW with
respect to the layer's own weight (HVPs in W, MAML) would apply S twice, which is biased: it
is refused with `SecondOrderError`. torch.compile does not take second derivatives at all.

Caveats:
  * Nothing is sketched or saved when no weight gradient is needed (`torch.no_grad()`,
    `requires_grad=False` weights): the layer then runs exactly like `nn.Linear`. A layer in
    training mode with a trainable weight still draws its seed under `no_grad`, so that
    activation checkpointing (a no-grad forward, then a recompute in backward from the same
    RNG state) sees the same dropout masks and the same sketches in both passes.
  * Under `torch.autocast`, inputs are cast to the autocast dtype first, and the sketch is
    built and stored in that dtype (like the half-precision copy autocast would have saved).
  * Layers that read the same input tensor (Q, K and V of an attention block) share one
    sketch of it (same seed, same stored tensor) within one forward pass, so that input costs
    ρ of itself once, not 3ρ (docs/method.md §4.7); `sharing.py` says when a sketch is shared
    and how long it is kept.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from . import ops
from .second_order import SketchUse
from .sharing import DEFAULT_SHARING, SketchSharing
from .sketches import DEFAULT_SKETCH, Sketch, check_rho, draw_seed, get_sketch, sketch_rows

_AUTOCAST_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["RandomizedConv1D", "RandomizedLinear", "RandomizedLinearFunction", "SketchPlan", "draw_seed",
           "is_conv1d", "randomized_linear"]


_plan_tokens = itertools.count(1)
_SHARED_SITE = "shared"


@dataclass(frozen=True)
class SketchPlan:
    """How one layer sketches its input: validated once, reused by every call.

    NOTE: ρ and the sharing token are kept as strings because torch.compile always treats a
    string as a constant. A number attribute that differs between two compilations of one
    function (layers at different ρ, or the per-method copies `profile --compile` makes) turns
    symbolic, and then k = round(ρ·N) cannot enter the autograd Function's graph, nor a token a
    set: the compiled model would break its graph at every layer.
    """

    sketch: Sketch
    rho_text: str  # repr(ρ): exactly the float given
    min_rows: int = 1
    share: bool = True
    token: str = field(default_factory=lambda: f"plan-{next(_plan_tokens)}")  # stands for the layer when sharing
    name: str = ""  # the layer's name in its model (set by `convert`), for error messages

    @property
    def rho(self) -> float:
        return float(self.rho_text)

    def rows(self, n_rows: int) -> int:
        return sketch_rows(n_rows, self.rho, self.min_rows)

    def key(self, k: int, dtype: torch.dtype, rng_only: bool = False) -> tuple:
        return (self.sketch.name, k, dtype, rng_only)


def make_plan(rho: float, sketch: str | Sketch = DEFAULT_SKETCH, min_rows: int = 1, share: bool = True,
              name: str = "") -> SketchPlan:
    """Validate the settings (one clear ConfigError per bad value) and build the plan."""
    return SketchPlan(get_sketch(sketch), repr(check_rho(rho)), _check_min_rows(min_rows), bool(share), name=name)


def _check_min_rows(min_rows: int) -> int:
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ConfigError(f"min_rows must be an integer >= 1 (got {min_rows!r})")
    return min_rows


class RandomizedLinearFunction(torch.autograd.Function):
    """out = x Wᵀ + b; backward: exact dX and db, dW = (Sᵀ dY)ᵀ (Sᵀ X).

    Inputs: x, weight, bias, the plan, k, the sharing scope (or None), the sketch's `SketchUse`
    (None when compiling), then either nothing — this call draws a seed, sketches x and returns
    (out, *drawn), drawn = (*saved, seed) — or the `drawn` tensors another layer made of the
    same x, which this call uses, returning out alone.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, k, sharing, use, *shared):
        ctx.set_materialize_grads(False)
        out = F.linear(x, weight, bias)
        compiling = torch.compiler.is_compiling()
        ctx.plan, ctx.k, ctx.x_shape, ctx.device_type = plan, k, x.shape, x.device.type
        ctx.shared = len(shared)
        ctx.sharing = None if compiling else sharing
        ctx.use = use
        drawn = shared
        if not shared and k > 0:
            # one site for every sharing layer: equal draws of one input merge under compile (sharing.py)
            site = _SHARED_SITE if plan.share else plan.token
            drawn = tuple(ops.sketch_draw(x.reshape(-1, x.shape[-1]), plan.sketch, k, site))
        saved, seed = (drawn[:-1], drawn[-1]) if drawn else ((), None)
        keep_weight = weight if ctx.needs_input_grad[0] else None
        # NOTE: the seed stays on ctx in eager mode (8 bytes, left out of the saved-tensor
        # accounting so the reported bytes are the sketch's); a traced graph needs every
        # tensor it reads in backward saved, so there it is saved.
        ctx.seed_saved = compiling and seed is not None
        ctx.seed = None if ctx.seed_saved else seed
        ctx.save_for_backward(keep_weight, *saved, *((seed,) if ctx.seed_saved else ()))
        if shared:
            return out
        # Sᵀx is an output so that second-order gradients reach x through it; the seed and the
        # indices and scales of row-sampling sketches are not differentiable. A compiled graph
        # cannot take a second derivative anyway, and would pass zeros through S for nothing.
        ctx.second_order = ctx.needs_input_grad[0] and not compiling and bool(saved)
        ctx.mark_non_differentiable(*(drawn[1:] if ctx.second_order else drawn))
        return (out, *drawn)

    @staticmethod
    def backward(ctx, grad_out, *grad_drawn):
        weight, *saved = ctx.saved_tensors
        seed = saved.pop() if ctx.seed_saved else ctx.seed
        if ctx.sharing is not None:
            ctx.sharing.end_backward()
        grad_x = grad_w = grad_b = None
        with torch.autocast(ctx.device_type, enabled=False):
            if grad_out is not None:
                grad_x, grad_w, grad_b = _first_order(ctx, grad_out, weight, seed, saved)
            if getattr(ctx, "second_order", False) and grad_drawn and grad_drawn[0] is not None:
                # second order only: d⟨g, Sᵀx⟩/dx = S g
                through_sketch = ops.sketch_transpose(grad_drawn[0], ctx.plan.sketch, _rows(ctx.x_shape), seed,
                                                      saved)
                through_sketch = through_sketch.reshape(ctx.x_shape)
                grad_x = through_sketch if grad_x is None else grad_x + through_sketch
        return (grad_x, grad_w, grad_b, None, None, None, None) + (None,) * ctx.shared


def _rows(shape: torch.Size) -> int:
    n = 1
    for size in shape[:-1]:
        n *= size
    return n


def _first_order(ctx, grad_out: Tensor, weight: Tensor | None, seed, saved: list[Tensor]):
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_out.matmul(weight)
    y2 = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
    if ctx.needs_input_grad[1]:
        if ctx.use is not None:  # eager: refuse a biased second-order gradient (second_order.py)
            ctx.use.check(ctx.next_functions[1][0], repr(ctx.plan.name) if ctx.plan.name else "a RandomizedLinear")
        if ctx.k == 0:  # no rows at all (N = 0): the exact gradient is zero
            grad_w = grad_out.new_zeros(grad_out.shape[-1], ctx.x_shape[-1])
        else:
            sketched_y = ops.sketch_apply(y2, ctx.plan.sketch, ctx.k, seed, saved)
            grad_w = sketched_y.T.mm(saved[0])  # (d_out, k) @ (k, d_in)
            if ctx.use is not None and torch.is_grad_enabled():  # create_graph: dW may be differentiated
                ctx.use.watch(grad_w)
    if ctx.needs_input_grad[2]:
        grad_b = y2.sum(0)
    return grad_x, grad_w, grad_b


def _sketched_linear(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SketchPlan,
                     sharing: SketchSharing | None, anchor: Tensor) -> Tensor:
    """One grad-enabled call: reuse the sketch another layer made of `anchor`, or make one."""
    k = plan.rows(x.numel() // x.shape[-1]) if x.shape[-1] else 0
    if sharing is not None and not sharing.active():  # compiling: the compiler merges equal draws
        return RandomizedLinearFunction.apply(x, weight, bias, plan, k, None, None)[0]
    key = plan.key(k, x.dtype)
    found = sharing.take(anchor, key, plan.token) if sharing is not None and k > 0 else None
    if found is not None:
        use, drawn = found
        return RandomizedLinearFunction.apply(x, weight, bias, plan, k, sharing, use, *drawn)
    use = None if torch.compiler.is_compiling() else SketchUse()
    out, *drawn = RandomizedLinearFunction.apply(x, weight, bias, plan, k, sharing, use)
    if sharing is not None and k > 0:
        sharing.offer(anchor, key, plan.token, use, tuple(drawn))
    return out


def _draw_as_a_sketch_would(x: Tensor, plan: SketchPlan, sharing: SketchSharing | None) -> None:
    """Consume the RNG exactly as the grad-enabled call would, without sketching anything.

    NOTE: activation checkpointing runs a training forward under no_grad, then restores the
    RNG state and recomputes with grad in backward. If the first pass drew no sketch seeds but
    the recompute did, every later dropout mask in the recompute would differ from the one
    the loss was computed with. Drawing the same seeds (shared ones once, like the real
    pass) keeps both passes on one RNG stream, so the recompute is faithful and its sketch
    seeds equal those of a run without checkpointing.
    """
    k = plan.rows(x.numel() // max(x.shape[-1], 1))
    if k == 0:
        return
    key = plan.key(k, x.dtype, rng_only=True)
    sharing = sharing if sharing is not None and sharing.active() else None
    if sharing is not None and sharing.take(x, key, plan.token) is not None:
        return
    plan.sketch.draw_seed(x.device)  # what ops.sketch_draw draws, dropped
    if sharing is not None:
        sharing.offer(x, key, plan.token, None, ())


def randomized_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SketchPlan,
                       sharing: SketchSharing | None, training: bool) -> Tensor:
    """`F.linear(x, weight, bias)` with the weight gradient sketched as `plan` says."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        if training and weight.requires_grad and x.dim() > 0:
            _draw_as_a_sketch_would(x, plan, sharing if plan.share else None)
        return F.linear(x, weight, bias)  # no weight gradient: nothing to sketch (docs/method.md §4.3)
    sharing = sharing if plan.share else None
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype in _AUTOCAST_INPUT_DTYPES:
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _sketched_linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                    plan, sharing, anchor=x)
    return _sketched_linear(x, weight, bias, plan, sharing, anchor=x)


@functools.lru_cache(maxsize=256)
def _functional_plan(sketch: str | Sketch, rho: float, min_rows: int, share: bool, owner: int) -> SketchPlan:
    return make_plan(rho, sketch, min_rows, share)


def randomized_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, rho: float = 0.5,
                      sketch: str | Sketch = DEFAULT_SKETCH, min_rows: int = 1, share: bool = True,
                      owner: int = 0, training: bool = False) -> Tensor:
    """Functional form of `RandomizedLinear`: same output as `F.linear(x, weight, bias)`.

    `owner` names the caller for sketch sharing (calls with the same owner never share with
    each other). `training=True` marks a training forward: run under no_grad (checkpointing's
    first pass), it still draws the seeds it would sketch with, so the RNG stream matches the
    recompute.
    """
    plan = _functional_plan(sketch, rho, min_rows, share, owner)
    return randomized_forward(x, weight, bias, plan, DEFAULT_SHARING, training)


class _Sketched:
    """What every randomized layer shares: one validated `SketchPlan`, its settings, its sharing scope."""

    def configure(self, *, rho: float, sketch: str | Sketch = DEFAULT_SKETCH, min_rows: int = 1,
                  share_sketch: bool = True, name: str | None = None):
        """Validate the settings once and build the plan every forward reuses (`name`: the
        layer's name in its model, for error messages; by default the name it had)."""
        if name is None:
            name = self.plan.name if hasattr(self, "plan") else ""
        self.plan = make_plan(rho, sketch, min_rows, share_sketch, name)
        return self

    rho = property(lambda self: self.plan.rho)
    sketch = property(lambda self: self.plan.sketch)
    min_rows = property(lambda self: self.plan.min_rows)
    share_sketch = property(lambda self: self.plan.share)

    @classmethod
    def _holding(cls, original: nn.Module):
        """A new layer of this class holding `original`'s very Parameter objects, in its train/eval mode."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = original.weight
        layer.register_parameter("bias", original.bias)
        layer.train(original.training)
        layer.sharing = DEFAULT_SHARING
        return layer


class RandomizedLinear(_Sketched, nn.Linear):
    """Drop-in `nn.Linear` whose weight gradient is estimated from a sketch of its input.

    Args: as `nn.Linear`, plus
        rho: compression rate in (0, 1]; the sketch keeps k = round(ρ·N) of N token rows.
        sketch: a name from `randbp_cli.core.sketches.sketch_names()` or a `Sketch` instance.
        min_rows: lower clamp on k (k never exceeds N).
        share_sketch: share one sketch with other layers reading the same input tensor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rho: float = 0.5,
                 sketch: str | Sketch = DEFAULT_SKETCH, min_rows: int = 1, share_sketch: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.sharing: SketchSharing = DEFAULT_SHARING
        self.configure(rho=rho, sketch=sketch, min_rows=min_rows, share_sketch=share_sketch)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rho: float, sketch: str | Sketch = DEFAULT_SKETCH,
                    min_rows: int = 1, share_sketch: bool = True, name: str = "") -> "RandomizedLinear":
        """A RandomizedLinear holding the *same* Parameter objects as `linear` (no copies)."""
        layer = cls._holding(linear)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        return layer.configure(rho=rho, sketch=sketch, min_rows=min_rows, share_sketch=share_sketch, name=name)

    def forward(self, x: Tensor) -> Tensor:
        return randomized_forward(x, self.weight, self.bias, self.plan, self.sharing, self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rho={self.rho}, sketch={self.sketch.name}"


def is_conv1d(module: nn.Module) -> bool:
    """Is `module` transformers' `Conv1D` (GPT-2's linear layers: weight (in, out), y = x W + b)?
    Told by its class name and its `nf` attribute, so the core needs no transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class RandomizedConv1D(_Sketched, nn.Module):
    """transformers' `Conv1D` with its weight gradient estimated from a sketch of its input.

    The same estimator as `RandomizedLinear` in Conv1D's layout: the weight W is stored (in, out)
    and y = x W + b, so the layer runs `randomized_forward` on Wᵀ, a view of the same Parameter;
    autograd transposes the sketched dWᵀ = (Sᵀ dY)ᵀ (Sᵀ X) back into W's layout. dX = dY Wᵀ and
    db = Σ rows of dY are exact, and what is saved is what `RandomizedLinear` saves.
    """

    def __init__(self, nf: int, nx: int, *, rho: float = 0.5, sketch: str | Sketch = DEFAULT_SKETCH,
                 min_rows: int = 1, share_sketch: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.sharing: SketchSharing = DEFAULT_SHARING
        self.configure(rho=rho, sketch=sketch, min_rows=min_rows, share_sketch=share_sketch)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, **settings) -> "RandomizedConv1D":
        """A RandomizedConv1D holding the *same* Parameter objects as `conv` (no copies); `settings`
        (rho, sketch, min_rows, share_sketch, name) as `RandomizedLinear.from_linear` takes them."""
        layer = cls._holding(conv)
        layer.nf, layer.nx = conv.nf, conv.weight.shape[0]
        return layer.configure(**settings)

    def forward(self, x: Tensor) -> Tensor:
        return randomized_forward(x, self.weight.T, self.bias, self.plan, self.sharing, self.training)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, rho={self.rho}, sketch={self.sketch.name}"
