"""`randbp profile` as a library call: activation memory and step time, exact vs randomized.

`run_profile(ProfileConfig(...))` loads the model once, builds one fixed batch per batch size
from the seed, and measures every case (the exact baseline and each ρ × sketch) on the
same inputs:

  1. per case: `warmup` training steps, then one forward pass under `SavedTensorCounter`
     (exact bytes saved for backward), then, on CUDA, one step with allocator phases, with
     NVML sampling the device during the case's steps;
  2. timing: `steps` rounds; each round runs one full training step (forward, backward,
     AdamW step) of every case in turn, so slow drifts of a noisy machine hit all cases
     alike and the time ratios compare like with like.
With `isolate=True` each case runs in a fresh process instead (same seed, same weights).
"""

from __future__ import annotations

import gc
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .convert import convert, converted_names, restore
from .errors import ConfigError, DeviceError
from .memory import (NvmlSampler, RecomputeCounter, checkpoint_units, count_saved_bytes, cuda_step_memory,
                     summarize_times, time_call)
from .models import load_model, max_sequence_length
from .sketches import check_rho, get_sketch

SCHEMA = "randbp.profile/1"
# exact is always measured (the baseline); the others are chosen with --method
METHODS = ("exact", "randomized", "checkpoint", "checkpoint+randomized")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}

Progress = Callable[[str, int], None]  # (what is running, steps completed so far)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: choose one of float32, float16, bfloat16, float64") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without CUDA is a DeviceError."""
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but CUDA is not available on this machine "
                              "(no GPU or no CUDA build of torch); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def method_label(method: str, rho: float | None, sketch: str | None) -> str:
    """'exact', 'checkpoint', 'countsketch rho=0.1', 'checkpoint+countsketch rho=0.1'."""
    if sketch is None or rho is None:
        return method
    what = f"{sketch} rho={rho:g}"
    return f"checkpoint+{what}" if method.startswith("checkpoint") else what


@dataclass(frozen=True)
class ProfileCase:
    method: str  # one of METHODS
    rho: float | None
    sketch: str | None
    batch_size: int

    @property
    def randomized(self) -> bool:
        return self.method.endswith("randomized")

    @property
    def checkpointed(self) -> bool:
        return self.method.startswith("checkpoint")

    @property
    def label(self) -> str:
        return f"{method_label(self.method, self.rho, self.sketch)} b={self.batch_size}"


@dataclass
class ProfileConfig:
    model: str = "roberta-base"
    rhos: Sequence[float] = field(default_factory=lambda: [0.5])
    sketches: Sequence[str] = field(default_factory=lambda: ["gaussian"])
    methods: Sequence[str] = field(default_factory=lambda: ["randomized"])  # besides the exact baseline
    batch_sizes: Sequence[int] = field(default_factory=lambda: [8])
    seq_len: int = 128
    device: str = "auto"
    dtype: str = "float32"
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    isolate: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None
    attn_implementation: str | None = None
    offline: bool = False
    num_labels: int = 2
    lr: float = 1e-5
    budget_mib: float | None = None  # find the largest batch whose activations fit this budget
    budget_max_batch: int = 1024

    def validate(self) -> None:
        for method in self.methods:
            if method not in METHODS:
                raise ConfigError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
        if self.budget_mib is not None and not self.budget_mib > 0:
            raise ConfigError(f"--budget-mib must be positive (got {self.budget_mib})")
        if not self.rhos:
            raise ConfigError("give at least one --rho")
        for rho in self.rhos:
            check_rho(rho)
        for sketch in self.sketches:
            get_sketch(sketch)
        if not self.sketches:
            raise ConfigError("give at least one --sketch")
        for batch in self.batch_sizes:
            if batch <= 0:
                raise ConfigError(f"--batch-size must be a positive integer (got {batch})")
        if not self.batch_sizes:
            raise ConfigError("give at least one --batch-size")
        if self.seq_len <= 0:
            raise ConfigError(f"--seq-len must be a positive integer (got {self.seq_len})")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1 (got {self.steps})")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be 0 or more (got {self.warmup})")
        resolve_dtype(self.dtype)

    def cases(self) -> list[ProfileCase]:
        methods = [m for m in METHODS if m in self.methods or m == "exact"]
        sketches = list(dict.fromkeys(get_sketch(s).name for s in self.sketches))
        rhos = list(dict.fromkeys(float(r) for r in self.rhos))
        cases = []
        for batch in dict.fromkeys(self.batch_sizes):
            for method in methods:
                if method.endswith("randomized"):
                    cases += [ProfileCase(method, rho, sketch, batch) for sketch in sketches for rho in rhos]
                else:
                    cases.append(ProfileCase(method, None, None, batch))
        return cases


# ---------------------------------------------------------------------------- one model, many cases


def make_batch(model: nn.Module, batch_size: int, seq_len: int, seed: int, device: torch.device,
               num_labels: int) -> dict[str, torch.Tensor]:
    """A fixed batch of random token ids (memory does not depend on their values)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch_size)
    vocab = model.config.vocab_size
    low = min(3, vocab - 1)  # skip <s>, <pad>, </s> so no token is padding
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=gen)
    if num_labels == 1:
        labels = torch.rand(batch_size, generator=gen)
    else:
        labels = torch.randint(0, num_labels, (batch_size,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


class _Trainer:
    """Holds the model, optimizer and batches; runs one case's steps."""

    def __init__(self, model: nn.Module, config: ProfileConfig, device: torch.device) -> None:
        self.model = model.to(device)
        self.model.train()
        self.config = config
        self.device = device
        # foreach=False keeps AdamW's transient buffers small and the same for every case
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, foreach=False)
        self.batches = {b: make_batch(self.model, b, config.seq_len, config.seed, device, config.num_labels)
                        for b in dict.fromkeys(config.batch_sizes)}
        self.randomized_layers = 0

    def apply(self, case: ProfileCase) -> None:
        self.model = restore(self.model)
        set_checkpointing(self.model, case.checkpointed)
        if case.randomized:
            self.model = convert(self.model, case.rho, sketch=case.sketch,
                                 include=self.config.include, exclude=self.config.exclude)
        self.randomized_layers = len(converted_names(self.model))

    def forward(self, case: ProfileCase) -> torch.Tensor:
        return self.model(**self.batches[case.batch_size]).loss

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, case: ProfileCase) -> None:
        self.backward_and_step(self.forward(case))

    def count(self, case: ProfileCase, batch: dict, step: bool = True) -> dict:
        """Saved bytes of one forward on `batch` (and, when checkpointed, of each recompute)."""
        loss, stats = count_saved_bytes(lambda: self.model(**batch).loss, self.model, exclude=batch.values())
        out = {"activation_bytes": stats.total_bytes, "activation_bytes_by_kind": dict(stats.by_kind),
               "activation_bytes_by_module": stats.by_module_folded(), "saved_storages": stats.storages}
        if case.checkpointed:
            units = checkpoint_units(self.model)
            with RecomputeCounter(self.model, units) as recompute:
                loss.backward()
            per_unit = recompute.unit_bytes()
            largest = max(per_unit.values(), default=0)
            out["checkpointing"] = {"units": len(units), "recompute_unit_bytes": largest,
                                    "note": "each unit's input is kept; one unit at a time is recomputed "
                                            "in backward (reentrant torch.utils.checkpoint)"}
            out["activation_peak_bytes"] = stats.total_bytes + largest
        else:
            out["activation_peak_bytes"] = stats.total_bytes
            if step:
                loss.backward()
        if step:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def measure_memory(self, case: ProfileCase) -> dict:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()  # so NVML sees this case, not the cache of the last one
        with NvmlSampler(self.device) as sampler:
            for _ in range(self.config.warmup):
                self.step(case)
            counted = self.count(case, self.batches[case.batch_size])
            cuda = None
            if self.device.type == "cuda":
                cuda = cuda_step_memory(lambda: self.forward(case), self.backward_and_step, self.device)
        return {**counted, "randomized_layers": self.randomized_layers, "cuda": cuda,
                "nvml": sampler.result() if self.device.type == "cuda" else None}

    def peak_bytes_at(self, case: ProfileCase, batch_size: int) -> int:
        """activation_peak_bytes of `case` at another batch size (no optimizer step)."""
        batch = make_batch(self.model, batch_size, self.config.seq_len, self.config.seed, self.device,
                           self.config.num_labels)
        return self.count(case, batch, step=False)["activation_peak_bytes"]

    def largest_batch_within(self, case: ProfileCase, budget_bytes: float) -> dict:
        """The largest batch whose activation peak fits `budget_bytes`, found by measuring.

        Saved bytes grow linearly with the batch at a fixed length, so two measurements
        (batch 1 and 2) predict the answer; it is then confirmed by measuring there and one
        above, stepping until the boundary is measured on both sides.
        """
        limit = self.config.budget_max_batch
        one, two = self.peak_bytes_at(case, 1), self.peak_bytes_at(case, 2)
        measured = {1: one, 2: two}
        per_sample = max(two - one, 1)
        guess = int((budget_bytes - (one - per_sample)) // per_sample)
        guess = max(1, min(limit, guess))

        def fits(batch: int) -> bool:
            if batch not in measured:
                measured[batch] = self.peak_bytes_at(case, batch)
            return measured[batch] <= budget_bytes

        if not fits(1):
            best = 0
        else:
            best = guess
            while best > 1 and not fits(best):
                best -= 1
            while best < limit and fits(best + 1):
                best += 1
        return {"budget_bytes": budget_bytes, "max_batch_size": best,
                "activation_peak_bytes": measured.get(best), "capped": best == limit,
                "measured": {str(k): v for k, v in sorted(measured.items())}}


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Hugging Face activation checkpointing, reentrant, so its saved inputs pass our hooks."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if on:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def _case_result(case: ProfileCase, config: ProfileConfig, device: torch.device, model_name: str) -> dict:
    return {"model": model_name, "method": case.method, "rho": case.rho, "sketch": case.sketch,
            "batch_size": case.batch_size, "seq_len": config.seq_len,
            "tokens": case.batch_size * config.seq_len,
            "dtype": dtype_name(resolve_dtype(config.dtype)), "device": device.type}


def _profile_in_process(loaded_model: nn.Module, model_name: str, config: ProfileConfig,
                        cases: list[ProfileCase], device: torch.device,
                        progress: Progress | None) -> list[dict]:
    trainer = _Trainer(loaded_model, config, device)
    done = 0
    results = []
    for case in cases:
        if progress:
            progress(f"memory: {case.label}", done)
        trainer.apply(case)
        result = _case_result(case, config, device, model_name)
        result.update(trainer.measure_memory(case))
        results.append(result)
        done += config.warmup + 1 + (device.type == "cuda")
    samples: list[list[float]] = [[] for _ in cases]
    for round_index in range(config.steps):
        for i, case in enumerate(cases):
            if progress:
                progress(f"timing round {round_index + 1}/{config.steps}: {case.label}", done)
            trainer.apply(case)
            samples[i].append(time_call(lambda: trainer.step(case), device))
            done += 1
    for result, case_samples in zip(results, samples):
        result["step_time_s"] = summarize_times(case_samples)
    if config.budget_mib is not None:
        seen = set()
        for result, case in zip(results, cases):
            key = (case.method, case.rho, case.sketch)
            if key in seen:
                continue
            seen.add(key)
            if progress:
                progress(f"budget {config.budget_mib:g} MiB: {case.label}", done)
            trainer.apply(case)
            result["budget"] = trainer.largest_batch_within(case, config.budget_mib * 2**20)
    trainer.apply(ProfileCase("exact", None, None, cases[0].batch_size))
    if progress:
        progress("done", done)
    return results


def total_steps(config: ProfileConfig, device: torch.device) -> int:
    per_case = config.warmup + 1 + (device.type == "cuda") + config.steps
    return per_case * len(config.cases())


def _isolated_case(config_dict: dict, case_dict: dict, device_name: str) -> dict:
    """Entry point of a fresh process for one case (`isolate=True`)."""
    config = ProfileConfig(**config_dict)
    device = torch.device(device_name)
    loaded = load_model(config.model, num_labels=config.num_labels, dtype=resolve_dtype(config.dtype),
                        attn_implementation=config.attn_implementation, offline=config.offline,
                        seed=config.seed)
    return _profile_in_process(loaded.model, loaded.name, config, [ProfileCase(**case_dict)], device, None)[0]


def run_profile(config: ProfileConfig, progress: Progress | None = None) -> dict:
    """Measure every case of `config`; return the `randbp.profile/1` report as a dict."""
    from .report import environment

    config.validate()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype)
    loaded = load_model(config.model, num_labels=config.num_labels, dtype=dtype,
                        attn_implementation=config.attn_implementation, offline=config.offline,
                        seed=config.seed)
    limit = max_sequence_length(loaded.model)
    if config.seq_len > limit:
        raise ConfigError(f"--seq-len {config.seq_len} is longer than the model's {limit} positions; "
                          f"use --seq-len {limit} or less")
    cases = config.cases()
    convert(loaded.model, 0.5, include=config.include, exclude=config.exclude)  # check patterns early
    restore(loaded.model)
    if config.isolate:
        context = multiprocessing.get_context("spawn")
        results = []
        per_case = total_steps(config, device) // len(cases)
        for i, case in enumerate(cases):
            if progress:
                progress(f"isolated process: {case.label}", i * per_case)
            with context.Pool(1) as pool:
                results.append(pool.apply(_isolated_case, (asdict(config), asdict(case), str(device))))
        if progress:
            progress("done", len(cases) * per_case)
    else:
        results = _profile_in_process(loaded.model, loaded.name, config, cases, device, progress)
    _add_comparisons(results)
    return {
        "schema": SCHEMA,
        "environment": environment(device),
        "config": {**asdict(config), "rhos": list(config.rhos), "sketches": list(config.sketches),
                   "methods": list(config.methods), "batch_sizes": list(config.batch_sizes),
                   "device": str(device), "dtype": dtype_name(dtype)},
        "model": {**loaded.describe(), "max_seq_len": limit},
        "results": results,
    }


def _add_comparisons(results: list[dict]) -> None:
    """Saving vs exact, the METHOD §5 limit, and time ratio, each against the same batch size."""
    exact = {r["batch_size"]: r for r in results if r["method"] == "exact"}
    for r in results:
        base = exact.get(r["batch_size"])
        if base is None:
            continue
        r["activation_saving_vs_exact"] = 1 - r["activation_bytes"] / base["activation_bytes"]
        r["activation_peak_saving_vs_exact"] = 1 - r["activation_peak_bytes"] / base["activation_peak_bytes"]
        if r["method"] in ("exact", "randomized"):
            linear_only = base["activation_bytes_by_kind"]["linear_inputs"]
            rho = 1.0 if r["rho"] is None else r["rho"]
            # the most sketching can save: every input kept only by linear layers shrinks to ρ of itself
            r["activation_limit_bytes"] = base["activation_bytes"] - (1 - rho) * linear_only
        base_time = base["step_time_s"]["median"]
        r["time_ratio_vs_exact"] = (r["step_time_s"]["median"] / base_time) if base_time else None
    # what each part of checkpoint+randomized contributed, against plain checkpointing
    checkpoint = {r["batch_size"]: r for r in results if r["method"] == "checkpoint"}
    for r in results:
        ckpt, base = checkpoint.get(r["batch_size"]), exact.get(r["batch_size"])
        if r["method"] != "checkpoint+randomized" or ckpt is None or base is None:
            continue
        r["contributions"] = {
            "checkpointing_stored_bytes_saved": base["activation_bytes"] - ckpt["activation_bytes"],
            "randomized_stored_bytes_saved": ckpt["activation_bytes"] - r["activation_bytes"],
            "randomized_recompute_bytes_saved": ckpt["checkpointing"]["recompute_unit_bytes"]
                                                - r["checkpointing"]["recompute_unit_bytes"],
            "note": "checkpointing keeps only each layer's input between the passes; the randomized "
                    "layers shrink what one layer saves while it is recomputed in backward (and what "
                    "layers outside the checkpointed units keep)",
        }
