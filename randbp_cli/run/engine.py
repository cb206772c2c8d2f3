"""The one run engine `profile`, `finetune` and `variance` drive.

An `Engine` holds a model on its device, with its optimizer (and, optionally, a learning-rate
schedule), and knows five things:

  apply(method)      put the model into a `Method` (checkpointing, randomized layers, savers),
                     compiled with `torch.compile` when a compile mode is given
  forward/backward   one pass each, through the DistributedDataParallel wrapper when there is one
  optimizer_step()   step the optimizer (and the schedule), then drop the gradients
  probe(batch)       the bytes one forward saves for backward, and, in backward, the largest
                     recompute of a checkpointed unit (docs/method.md §4.6)
  timed_step(batch)  the wall-clock seconds of one whole training step

The commands own their loops (profile's rounds of cases, finetune's epochs, variance's
measured steps); they hear about progress through the callbacks defined here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.convert import KEPT_ANYWAY, converted_names, inputs_kept_anyway, restore, select_linears
from ..measure.memory import RecomputeCounter, SavedTensorCounter, SavedTensorStats, checkpoint_units
from ..measure.meters import compile_events, cuda_step_memory, time_call
from .distributed import SINGLE, Distributed
from .methods import Method, prepare_model

Batch = dict[str, Tensor]
Progress = Callable[[str, int], None]  # (what is running, steps completed so far)


_steps_running = 0


@contextmanager
def interruptible():
    """Marks work a second Ctrl-C may cut short (training and measuring steps, whose loops catch the
    KeyboardInterrupt and keep what finished). Outside it, the CLI's handler only records the stop:
    writing what was kept must never be cut short."""
    global _steps_running
    _steps_running += 1
    try:
        yield
    finally:
        _steps_running -= 1


def interruptible_now() -> bool:
    return _steps_running > 0


@dataclass
class TrainCallbacks:
    """How the caller hears about progress and asks to stop (the library never prints)."""

    on_run_start: Callable[[str, int], None] | None = None  # (run name, total optimizer steps)
    on_step: Callable[[str, int, float, float], None] | None = None  # (run, step, loss, lr)
    on_epoch: Callable[[str, dict], None] | None = None  # (run, epoch record)
    should_stop: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class Probe:
    """What one probed training step saved: the forward's stored bytes, the recompute's largest unit."""

    stats: SavedTensorStats
    checkpoint_units: int  # 0 without activation checkpointing
    recompute_unit_bytes: int | None  # None when backward was not run

    @property
    def peak_bytes(self) -> int:
        """Stored bytes plus the one unit recomputed at a time in backward."""
        return self.stats.total_bytes + (self.recompute_unit_bytes or 0)


class Engine:
    """A model on a device in one method at a time, and its optimizer.

    Compiled (`compile` = a torch.compile mode), each method gets its own copy of the module
    tree — sharing the very Parameter and buffer tensors, so one optimizer steps them all —
    compiled once and kept: switching methods (profile's interleaved rounds) then costs a
    dictionary lookup, not a recompilation. Saved bytes are still counted on the eager tree
    (`probe`): the same layers, seen one saved tensor at a time.
    """

    def __init__(self, model: nn.Module, device: torch.device, *, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, dist: Distributed = SINGLE, compile: str | None = None) -> None:
        self.model = model.to(device)
        self.model.train()
        self.eager_runner: nn.Module = self.model  # a DDP wrapper with several ranks
        self.runner: nn.Module = self.model  # what training steps go through: eager_runner, compiled or not
        self.device = device
        self.include, self.exclude = include, exclude
        self.dist = dist
        self.compile = compile
        self._base = self.model  # compiled: the plain tree every method's copy is made from
        self._compiled: dict[Method, tuple[nn.Module, nn.Module, nn.Module]] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.left_exact: dict[str, str] = {}  # layers randomized methods leave exact, and why
        self._probe_batch: Batch | None = None

    def leave_kept_inputs_exact(self, batch: Batch) -> None:
        """Randomized methods will leave exact the selected layers whose input another op saves for
        backward anyway (a sketch would free nothing): found once, by a probe forward of `batch`."""
        self._probe_batch = batch

    def _find_kept_inputs(self) -> None:
        base = restore(self.model)
        selected = [name for name in select_linears(base, self.include, self.exclude)
                    if base.get_submodule(name).weight.requires_grad]
        kept = inputs_kept_anyway(base, selected, lambda model: model(**self._probe_batch))
        self.left_exact = dict.fromkeys(kept, KEPT_ANYWAY)
        self.exclude = [*(self.exclude or []), *kept]
        self._probe_batch = None

    def apply(self, method: Method) -> None:
        """Put the model into `method` (the same Parameters: an optimizer built earlier still fits)."""
        if method.randomized and self._probe_batch is not None:
            self._find_kept_inputs()
        if self.compile is not None:
            if method not in self._compiled:
                self._compiled[method] = self._compile(method)
            self.model, self.eager_runner, self.runner = self._compiled[method]
            return
        self.model = prepare_model(self.model, method, self.include, self.exclude)
        self.eager_runner = self.runner = self._distributed(self.model, method)

    def _distributed(self, model: nn.Module, method: Method) -> nn.Module:
        if not self.dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # static_graph: reentrant checkpointing re-runs each layer in backward, which DDP's
        # default gradient bookkeeping would see as the same parameter becoming ready twice
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, static_graph=method.checkpoint)

    def _compile(self, method: Method) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(the method's own module tree, its DDP wrapper or itself, that compiled)."""
        import copy

        import torch._dynamo

        shared = {id(t): t for t in (*self._base.parameters(), *self._base.buffers())}
        tree = prepare_model(copy.deepcopy(self._base, memo=shared), method, self.include, self.exclude)
        eager = self._distributed(tree, method)
        # one compiled tree per method: let Dynamo keep an entry for each instead of falling back to eager
        limit = 8 * (len(self._compiled) + 1)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit,
                                                                8 * limit)
        return tree, eager, torch.compile(eager, mode=self.compile)

    def use_optimizer(self, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler

    @property
    def converted(self) -> list[str]:
        """Names of the linear layers the current method randomized."""
        return converted_names(self.model)

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, batch: Batch) -> Tensor:
        return self.runner(**batch).loss

    @staticmethod
    def backward(loss: Tensor, scale: int = 1) -> None:
        """Backward of `loss / scale` (the share of one micro-batch under gradient accumulation)."""
        (loss / scale if scale != 1 else loss).backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batch: Batch) -> Tensor:
        """One whole training step: forward, backward, optimizer step. Returns the loss."""
        loss = self.forward(batch)
        self.backward(loss)
        self.optimizer_step()
        return loss

    def timed_step(self, batch: Batch, retries: int = 3) -> float:
        """Seconds of one training step. Compiled, a step during which anything compiled (a
        recompile, a lazily compiled backward) is not a measurement: it is run again."""
        for _ in range(retries + 1):
            before = compile_events()
            seconds = time_call(lambda: self.step(batch), self.device)
            if self.compile is None or compile_events() == before:
                return seconds
        raise RuntimeError(f"torch.compile kept recompiling: {retries + 1} steps in a row compiled something")

    def warm_up(self, batch: Batch, steps: int, max_extra: int = 8) -> int:
        """`steps` training steps; compiled, more until one compiles nothing (at most
        `max_extra` more). Returns how many steps ran."""
        if self.compile is None:
            for _ in range(steps):
                self.step(batch)
            return steps
        for done in range(1, steps + max_extra + 1):
            before = compile_events()
            self.step(batch)
            if done >= steps and compile_events() == before:
                return done
        return steps + max_extra

    def compiled_saved_bytes(self, batch: Batch) -> dict:
        """What the compiled graphs save for backward in one training step: every storage once,
        parameters, buffers and inputs excluded (no module attribution: a compiled graph runs
        as one). Leaves the gradients, as `probe` does."""
        with SavedTensorCounter(exclude=[*self.model.parameters(), *self.model.buffers(), *batch.values()]) as counter:
            loss = self.forward(batch)
        stats = counter.stats()
        self.backward(loss)
        return {"activation_bytes": stats.total_bytes, "saved_storages": stats.storages}

    def cuda_step_memory(self, batch: Batch) -> dict:
        """CUDA allocator phases of one training step (meters.cuda_step_memory)."""

        def backward_and_step(loss: Tensor) -> None:
            self.backward(loss)
            self.optimizer_step()

        return cuda_step_memory(lambda: self.forward(batch), backward_and_step, self.device)

    def probe(self, batch: Batch, *, backward: bool = True, scale: int = 1) -> tuple[Tensor, Probe]:
        """One forward counting the bytes saved for backward; with `backward`, the backward too,
        counting what each checkpointed unit saves while it is recomputed. Leaves the gradients."""
        with SavedTensorCounter(self.model, exclude=batch.values()) as counter:
            loss = self.eager_runner(**batch).loss  # eager: a compiled graph saves out of the hooks' sight
        stats = counter.stats()
        units = checkpoint_units(self.model)
        recompute = None
        if backward:
            with RecomputeCounter(self.model, units) as recomputed:
                self.backward(loss, scale)
            recompute = max(recomputed.unit_bytes().values(), default=0)
        return loss, Probe(stats, len(units), recompute)
