"""The JSON record: a dataclass that is exactly one JSON object, and the measurements reports hold.

`Record.from_dict` is the one place a JSON object becomes a typed value: every field is checked
against its annotation (shapes.py), a nested record (`NESTED`) or a list of them (`ROWS`) is read
by its own class, and keys this version does not know are kept (`extra`) and written back as they
were, so a report read back and written again is the same document. A field the object lacked
stays out of it (`missing`), rather than coming back as null.

The measurement records below say their unit in every key (`_bytes`, `_s`); what each number
means, and what it depends on, is said once, here. The meters (measure/meters.py) return plain
numbers; the commands put them into these records.
"""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import dataclass, field, fields
from typing import ClassVar

from ..errors import ReportError
from .shapes import at, check_shape, or_null, shown

_BOOKKEEPING = frozenset({"extra", "missing", "source"})  # dataclass fields that are not JSON keys


@functools.cache
def _field_specs(cls) -> dict:
    """Each JSON field of a record: its annotation, or what SHAPES says about its object (null
    where the annotation allows it)."""
    hints, specs = typing.get_type_hints(cls), {}
    for f in fields(cls):
        if f.name in _BOOKKEEPING:
            continue
        hint, shape = hints[f.name], cls.SHAPES.get(f.name)
        if shape is not None and type(None) in typing.get_args(hint):
            shape = or_null(shape)
        specs[f.name] = hint if shape is None else shape
    return specs


@dataclass(kw_only=True)
class Record:
    """A dataclass that is exactly one JSON object: its fields in order, then the unknown keys."""

    extra: dict = field(default_factory=dict, repr=False)  # keys this version does not know, kept as read
    missing: frozenset[str] = field(default=frozenset(), repr=False)  # fields the object read lacked
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()  # keys a report leaves out rather than null
    ROWS: ClassVar[dict[str, type[Record]]] = {}  # list fields whose items are records themselves
    NESTED: ClassVar[dict[str, type[Record]]] = {}  # object fields that are records themselves
    REQUIRED: ClassVar[frozenset[str]] = frozenset()  # keys a record cannot be read without
    SHAPES: ClassVar[dict[str, object]] = {}  # what the code reads out of a field's object (see check_shape)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            left_out = f.name in self.missing or (value is None and f.name in self.OMIT_IF_NONE)
            if f.name in _BOOKKEEPING or left_out:
                continue
            if f.name in self.ROWS:
                value = [row.to_dict() for row in value]
            elif isinstance(value, Record):
                value = value.to_dict()
            out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict, where: str = ""):
        """The record of a JSON object, its shape checked (a ReportError naming the key path
        otherwise): what a report read back holds is written back unchanged."""
        if not isinstance(data, dict):
            raise ReportError(f"{where or 'the report'} must be an object (got {shown(data)})")
        specs = _field_specs(cls)
        for name in sorted(cls.REQUIRED):
            if data.get(name) is None:
                raise ReportError(f"{where or 'the report'} has no {json.dumps(name)}")
        known = {key: value for key, value in data.items() if key in specs}
        for name, value in known.items():
            if name in cls.ROWS and isinstance(value, list):
                known[name] = [cls.ROWS[name].from_dict(item, at(at(where, name), index))
                               for index, item in enumerate(value)]
            elif name in cls.NESTED and value is not None:
                known[name] = cls.NESTED[name].from_dict(value, at(where, name))
            else:
                check_shape(value, specs[name], at(where, name))
        return cls(**known, extra={key: value for key, value in data.items() if key not in specs},
                   missing=frozenset(specs.keys() - known.keys()))

    @classmethod
    def of(cls, data: dict | None):
        """`from_dict` for what this program measured itself (None stays None)."""
        return None if data is None else cls.from_dict(data, cls.__name__)


# ---------------------------------------------------------------------------- measurements


@dataclass(kw_only=True)
class StepTimes(Record):
    """Wall-clock seconds of whole training steps (forward, backward, optimizer step), synchronised
    on a GPU, over the timed steps after the warm-up: their median, extremes and every sample."""

    median: float | None = None
    min: float | None = None
    max: float | None = None
    samples: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class CudaMemory(Record):
    """The CUDA caching allocator during one training step (after a warm-up step). `resting`: what
    is allocated between steps (weights, kept gradients, optimizer state); `forward_growth`: what
    the forward pass added (activations kept for backward, and the loss); `peak_allocated` and
    `peak_reserved`: the allocator's high-water marks; `step_peak`: peak minus resting, the step's
    own working memory. A fine-tuning run records the peaks only."""

    resting_allocated_bytes: int | None = None
    forward_growth_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    step_peak_bytes: int | None = None
    peak_reserved_bytes: int | None = None


@dataclass(kw_only=True)
class NvmlMemory(Record):
    """The device's own used-memory counter, sampled from a thread during the timed steps. It is the
    whole device, as nvidia-smi shows it: other processes and the CUDA context included, so it is
    shown and never judged. `available` false comes with the `reason`."""

    available: bool | None = None
    device_name: str | None = None
    driver_version: str | None = None
    total_bytes: int | None = None
    peak_used_bytes: int | None = None
    baseline_used_bytes: int | None = None  # read just before sampling starts
    samples: int | None = None
    interval_s: float | None = None
    reason: str | None = None


@dataclass(kw_only=True)
class BatchBudget(Record):
    """`--budget-mib`: the largest batch (`over` "batch", at the report's sequence length) or the
    longest sequence (`over` "seq", at `batch_size`) whose activation peak (saved bytes plus the
    largest recompute) fits `budget_bytes`, found by measuring; `capped` when the search hit its
    limit; `measured`: batch size (or sequence length) -> activation peak bytes of every one
    measured on the way. `over` and what only a sequence search has are left out of a batch
    search's record (as in reports made before the sequence search existed)."""

    OMIT_IF_NONE = frozenset({"over", "max_seq_len", "batch_size"})
    budget_bytes: float | None = None
    over: str | None = None
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    batch_size: int | None = None  # over "seq": the batch the sequences were measured at
    activation_peak_bytes: int | None = None
    capped: bool | None = None
    measured: dict[str, int] | None = None


@dataclass(kw_only=True)
class RunMemory(Record):
    """A fine-tuning run's memory: the saved-tensor bytes of one training step (by kind; exact), the
    activation peak with the largest recompute, and on CUDA the allocator's and the device's peaks."""

    activation_bytes: int | None = None
    activation_bytes_by_kind: dict[str, int] | None = None
    probe_batch_shape: list[int] | None = None  # the batch the bytes were counted on
    activation_peak_bytes: int | None = None
    recompute_unit_bytes: int | None = None
    cuda: CudaMemory | None = None
    nvml: NvmlMemory | None = None

    NESTED = {"cuda": CudaMemory, "nvml": NvmlMemory}
