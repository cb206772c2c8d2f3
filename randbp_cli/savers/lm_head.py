"""A language model's loss that never holds the logits: linear + cross-entropy, chunk by chunk (exact).

A causal LM's head turns N hidden states (N × H) into N × V logits, and the loss upcasts them to
float32 and keeps them (log-softmax's output) until backward: N × V × 4 bytes, often the largest
single activation of a decoder (96 MiB for SmolLM2 at 512 tokens, 501 MiB for Llama-3.2-1B at
1,024). `linear_cross_entropy` computes the same loss C rows at a time, so only a C × V block of
logits exists at once, and keeps for backward (through `ctx.save_for_backward`):

  head frozen (LoRA, or trained without it): the gradient with respect to the hidden states,
      N × H, computed in forward from each block while it exists (as torch's chunked
      `F.linear_cross_entropy` and Liger's fused linear cross-entropy do). Backward scales it by
      the incoming gradient. No recomputation: the same three products as the unfused head.
  head trained (full fine-tuning; a tied head trains the embedding too): the hidden states N × H
      and each row's log-sum-exp N × 1 (as Cut Cross-Entropy does). Backward recomputes each block
      of logits to form the gradients of hidden states, weight and bias: one more N × H × V product
      than the unfused head. Computing the weight's gradient in forward instead would keep a
      V × H float32 buffer until backward, larger than the logits unless N > H.

The loss, per row with target t ≠ ignore_index: logsumexp(z) − z_t for z = float32(h Wᵀ + b), the
product in the model's dtype (the autocast dtype under autocast), as transformers' loss computes it;
summed and divided by the count of targets, or by `num_items_in_batch` when given (transformers'
`fixed_cross_entropy`). The gradient of block z is (softmax(z) − onehot(t)) / count, zero on
ignored rows; it is cast to the product's dtype before its two products, as autograd does for
the unfused head. What is exact: the loss and every gradient, up to rounding (sums over V and N
are formed in blocks).

`reference_linear_cross_entropy` is the unfused computation, kept beside it: the tests hold the
one to the other. Second-order gradients do not flow through the fused function (its backward
is not written to be differentiated): a `create_graph` backward through it raises, rather than
return gradients that silently lack the loss's second-order part.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # transformers' (and F.cross_entropy's) default
# rows per block: a block of float32 logits of about this many bytes. Each block's products read the
# whole V × H weight, so a block must be tall enough that the reads do not outweigh the arithmetic:
# on the CPU 64 MiB (341 rows at SmolLM2's vocabulary) ran at the unfused head's speed
# (benchmarks/lm_head.py); a GPU needs several hundred rows per read of a bf16 weight to stay
# compute-bound (an H100 does ~300 bf16 flops per byte read), hence 256 MiB there (523 rows at
# Llama-3's vocabulary): arithmetic, not yet measured on a GPU (scripts/gpu_check.sh will)
BLOCK_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}
SECOND_ORDER = ("the lm-head saver's fused loss has no second-order gradients (create_graph=True): "
                "leave out --saver lm-head (restore_savers) for a double backward")


def block_rows(n_rows: int, vocab: int, device: str = "cpu", block_bytes: int | None = None) -> int:
    """Rows per block: as many as fit `block_bytes` (by default the device's `BLOCK_BYTES`) of float32
    logits, at least 1, at most all."""
    block_bytes = block_bytes or BLOCK_BYTES.get(device, BLOCK_BYTES["cpu"])
    return max(1, min(n_rows, block_bytes // (4 * max(vocab, 1))))


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the head's product runs in: autocast's where autocast is on, else the input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.is_floating_point():
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _block_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """float32 logits of one block, the product computed in `dtype` (weight and bias already in it;
    autocast off: the casts are done explicitly, once per call rather than once per block)."""
    with torch.autocast(hidden.device.type, enabled=False):
        z = F.linear(hidden.to(dtype), weight, bias)
    return z.float()


def _in_dtype(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _block_gradient(z: Tensor, lse: Tensor, targets: Tensor, scale: Tensor, ignore_index: int) -> Tensor:
    """(softmax(z) − onehot(targets)) × scale, zero on ignored rows; overwrites z (float32)."""
    valid = targets != ignore_index
    p = z.sub_(lse.unsqueeze(1)).exp_()
    rows = torch.arange(len(targets), device=z.device)
    p[rows, targets.clamp(min=0)] -= valid.to(p.dtype)
    return p.mul_((valid.to(p.dtype) * scale).unsqueeze(1))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """mean cross-entropy of (hidden Wᵀ + b) against targets, in blocks; the module doc has the rest."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, denominator: Tensor,
                ignore_index: int, rows: int) -> Tensor:
        dtype = _compute_dtype(hidden)
        scale = 1.0 / denominator.to(torch.float32)  # inf/nan when nothing is counted, as F.cross_entropy
        train_head = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        grad_hidden = (torch.empty_like(hidden, dtype=dtype) if ctx.needs_input_grad[0] and not train_head
                       else None)
        lse = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w, b = _in_dtype(weight, bias, dtype)
        for start in range(0, len(hidden), rows):
            block = slice(start, start + rows)
            t = targets[block]
            z = _block_logits(hidden[block], w, b, dtype)
            lse[block] = torch.logsumexp(z, dim=1)
            picked = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(t != ignore_index, lse[block] - picked, 0.0).sum()
            if grad_hidden is not None:
                p = _block_gradient(z, lse[block], t, scale, ignore_index)
                with torch.autocast(hidden.device.type, enabled=False):
                    grad_hidden[block] = p.to(dtype) @ w
        ctx.ignore_index, ctx.rows, ctx.dtype, ctx.train_head = ignore_index, rows, dtype, train_head
        ctx.has_bias, ctx.hidden_dtype = bias is not None, hidden.dtype
        if train_head:
            ctx.save_for_backward(hidden, weight, bias, targets, lse, scale)
        else:
            ctx.save_for_backward(grad_hidden)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # a create_graph backward: its result would silently lack this loss's part
            raise RuntimeError(SECOND_ORDER)
        if not ctx.train_head:
            (grad_hidden,) = ctx.saved_tensors
            if grad_hidden is None:
                return (None,) * 7
            return (grad_hidden * grad_loss).to(ctx.hidden_dtype), None, None, None, None, None, None
        hidden, weight, bias, targets, lse, scale = ctx.saved_tensors
        dtype, rows = ctx.dtype, ctx.rows
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = ctx.has_bias and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_bias else None
        w, b = _in_dtype(weight, bias, dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(hidden), rows):
                block = slice(start, start + rows)
                h = hidden[block].to(dtype)
                z = _block_logits(h, w, b, dtype)
                p = _block_gradient(z, lse[block], targets[block], scale * grad_loss, ctx.ignore_index)
                if grad_bias is not None:
                    grad_bias += p.sum(0)
                p = p.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[block] = p @ w
                if grad_weight is not None:  # accumulated over blocks in float32
                    if dtype == torch.float32:
                        grad_weight.addmm_(p.t(), h)
                    else:
                        grad_weight += (p.t() @ h).float()
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                         num_items_in_batch: Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                         rows: int | None = None) -> Tensor:
    """cross_entropy(linear(hidden, weight, bias).float(), targets) without the N × V logits.

    hidden (..., H), targets (...) of class indices or `ignore_index`. The mean over counted
    targets, or the sum divided by `num_items_in_batch` when given (transformers' convention).
    `rows`: rows per block (default `block_rows`)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device)
    rows = rows or block_rows(len(hidden), weight.shape[0], hidden.device.type)
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, targets, denominator, ignore_index, rows)


def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                                   num_items_in_batch: Tensor | int | None = None,
                                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The unfused computation `linear_cross_entropy` stands for (transformers' loss over the logits)."""
    logits = F.linear(hidden, weight, bias).float().reshape(-1, weight.shape[0])
    targets = targets.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss / torch.as_tensor(num_items_in_batch, device=loss.device)


def shift_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Position i predicts token i + 1: the labels moved one left, `ignore_index` at the end
    (transformers' `ForCausalLMLoss`)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


# ---------------------------------------------------------------------------- the saver's modules

SAVED_KIND = "lm_head_loss"
# transformers' causal LMs whose forward is `logits = self.lm_head(hidden_states)` then, with labels,
# `self.loss_function(logits, labels, vocab_size, **kwargs)` and nothing else done to the logits (read
# in transformers 5.2x); a class that scales or soft-caps its logits (Gemma 2, Cohere) is not one
LOSS_FORWARD_ATTR = "_randbp_fused_loss"  # on a causal LM with the fused forward: where `labels` sits
VERIFIED_HEADS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                  "GPT2LMHeadModel")


class FusedLMHead(nn.Module):
    """Stands in for a causal LM's `lm_head` (an nn.Linear), sharing its parameters (the very
    `_parameters` dict: a tied head stays tied, an optimizer built before still fits).

    head(hidden)                 the logits, as the linear layer computes them;
    head(hidden, targets=t)      `linear_cross_entropy` of the hidden states against t: the loss,
                                 the logits never held (what it keeps is filed as `lm_head_loss`).
    While `defer` is set (only inside `fused_loss_forward`), head(hidden) returns `hidden` itself:
    the model's forward then hands back the hidden states where the logits would be."""

    saved_kind = SAVED_KIND

    def __init__(self, original: nn.Linear) -> None:
        super().__init__()
        object.__setattr__(self, "_parameters", original._parameters)
        self.in_features, self.out_features = original.in_features, original.out_features
        self.defer = False

    def forward(self, hidden: Tensor, targets: Tensor | None = None, *,
                num_items_in_batch: Tensor | int | None = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
        if targets is not None:
            return linear_cross_entropy(hidden, self.weight, self.bias, targets,
                                        num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)
        if self.defer:
            return hidden
        return F.linear(hidden, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _labels_position(cls: type) -> int:
    """Where `labels` sits among the positional arguments of `cls.forward` (self excluded)."""
    return list(inspect.signature(cls.forward).parameters).index("labels") - 1


def fused_loss_forward(model: nn.Module, *args, **kwargs):
    """The causal LM's own forward, except that with labels and gradients on it returns the loss
    from `FusedLMHead` and no logits (`logits` is None), as Liger's fused forward does.

    The model's forward runs with no labels while its head hands back the hidden states; the loss
    is then transformers' causal-LM loss over them (labels shifted one left, or `shift_labels`;
    `ignore_index`; `num_items_in_batch`), computed block by block. Without labels, without
    gradients (evaluation), with `logits_to_keep`, or with `return_dict=False`, it is the model's
    own forward, logits and all."""
    cls, position = type(model), getattr(model, LOSS_FORWARD_ATTR)
    positional = len(args) > position
    labels = args[position] if positional else kwargs.get("labels")
    keep = kwargs.get("logits_to_keep", 0)
    if (labels is None or not torch.is_grad_enabled() or kwargs.get("return_dict") is False
            or not (isinstance(keep, int) and keep == 0)):
        return cls.forward(model, *args, **kwargs)
    if positional:
        args = (*args[:position], None, *args[position + 1:])
    else:
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
    head = model.lm_head
    head.defer = True
    try:
        out = cls.forward(model, *args, **kwargs)
    finally:
        head.defer = False
    ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)
    targets = kwargs.get("shift_labels")
    if targets is None:
        targets = shift_targets(labels, ignore_index)
    loss = head(out.logits, targets, num_items_in_batch=kwargs.get("num_items_in_batch"), ignore_index=ignore_index)
    return type(out)(**{k: v for k, v in out.items() if k not in ("loss", "logits")}, loss=loss)


def loss_refusal(model: nn.Module) -> str | None:
    """None if the lm-head saver can fuse `model`'s (a verified causal LM's) loss, else why not."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, FusedLMHead):
        return None
    if type(head) is not nn.Linear:
        return (f"its lm_head is a {type(head).__name__}, not an nn.Linear (randomized by convert, or wrapped "
                "by PEFT): apply the lm-head saver before convert, and keep the head out of the adapters")
    if "_loss_function" in vars(model):
        return "it has a loss function of its own (model.loss_function was set)"
    from transformers.loss.loss_utils import LOSS_MAPPING

    loss_type = getattr(model, "loss_type", None)  # None or unknown: transformers falls back to ForCausalLM
    if LOSS_MAPPING.get(loss_type, LOSS_MAPPING["ForCausalLM"]) is not LOSS_MAPPING["ForCausalLM"]:
        return f"its loss is not transformers' causal-LM loss (loss_type={loss_type!r})"
    return None


def install(model: nn.Module) -> None:
    """Make `model` (a verified causal LM whose lm_head is a FusedLMHead) use `fused_loss_forward`."""
    object.__setattr__(model, LOSS_FORWARD_ATTR, _labels_position(type(model)))
    object.__setattr__(model, "forward", types.MethodType(fused_loss_forward, model))


def uninstall(model: nn.Module) -> None:
    """Undo `install` (nothing if it was not installed)."""
    if model.__dict__.pop(LOSS_FORWARD_ATTR, None) is not None:
        model.__dict__.pop("forward", None)
