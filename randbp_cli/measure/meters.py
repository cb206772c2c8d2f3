"""What the device reports: step time, the CUDA allocator's phases of a step, NVML sampling.

These depend on the device, the allocator and whatever else runs on it, so they are reported
beside the exact saved-tensor bytes (memory.py), never instead of them.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

# ---------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of `fn()`, synchronised before and after on GPU."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def compile_events() -> int:
    """A count that grows whenever torch.compile compiles anything (a frame, a recompile, an
    AOT graph, Inductor's code, a backward graph compiled lazily at its first use)."""
    from torch._dynamo.utils import counters

    return sum(sum(counters[group].values()) for group in ("frames", "aot_autograd", "inductor"))


def summarize_times(samples: list[float]) -> dict:
    if not samples:
        return {"median": None, "min": None, "max": None, "samples": []}
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


# ---------------------------------------------------------------------------- CUDA allocator


def cuda_step_memory(forward: Callable[[], Tensor], backward_and_step: Callable[[Tensor], None],
                     device: torch.device) -> dict:
    """Allocator phases of one training step, measured after a warm-up step.

    resting: what is allocated between steps (weights, gradients if kept, optimizer state);
    forward_growth: allocation growth across the forward pass (activations kept for backward
    plus the loss); peak / peak_reserved: the allocator's high-water marks during the step;
    step_peak: peak minus resting, the step's own working memory.
    """
    synchronize(device)
    resting = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = forward()
    synchronize(device)
    after_forward = torch.cuda.memory_allocated(device)
    backward_and_step(loss)
    del loss
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "resting_allocated_bytes": resting,
        "forward_growth_bytes": after_forward - resting,
        "peak_allocated_bytes": peak,
        "step_peak_bytes": peak - resting,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


# ---------------------------------------------------------------------------- NVML


def _nvml():
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    return pynvml


def _nvml_handle(pynvml, device: torch.device):
    """NVML numbers devices differently from CUDA when CUDA_VISIBLE_DEVICES is set: go by UUID."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # noqa: BLE001 - older drivers or MIG: fall back to the index
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_info(device: torch.device) -> dict:
    """Device name, driver and total memory from NVML, or available=false with the reason."""
    try:
        pynvml = _nvml()
        handle = _nvml_handle(pynvml, device)
        return {
            "available": True,
            "device_name": _text(pynvml.nvmlDeviceGetName(handle)),
            "driver_version": _text(pynvml.nvmlSystemGetDriverVersion()),
            "total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        }
    except Exception as err:  # noqa: BLE001 - no library, no driver, no device: say why
        return {"available": False, "reason": f"{type(err).__name__}: {err}".strip()}


class NvmlSampler:
    """Samples the device's used memory from a background thread; reports the peak.

        with NvmlSampler(device) as sampler:
            run_steps()
        sampler.result()  # {"available": true, "peak_used_bytes": ..., ...} or available=false

    NVML's 'used' is the whole device, as nvidia-smi shows it: other processes and the CUDA
    context included. `baseline_used_bytes` is read just before sampling starts.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._samples = 0
        self._baseline = 0
        self._info: dict = {}

    def __enter__(self) -> "NvmlSampler":
        self._info = nvml_info(self.device) if self.device.type == "cuda" else {
            "available": False, "reason": f"device is {self.device.type}, not cuda"}
        if self._info["available"]:
            pynvml = _nvml()
            handle = _nvml_handle(pynvml, self.device)
            self._baseline = self._peak = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self._thread = threading.Thread(target=self._run, args=(pynvml, handle), daemon=True)
            self._thread.start()
        return self

    def _run(self, pynvml, handle) -> None:
        while not self._stop.is_set():
            used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self._peak = max(self._peak, used)
            self._samples += 1
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict:
        if not self._info.get("available"):
            return dict(self._info)
        return {**self._info, "peak_used_bytes": self._peak, "baseline_used_bytes": self._baseline,
                "samples": self._samples, "interval_s": self.interval_s}
