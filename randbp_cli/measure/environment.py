"""What made a report: versions, hardware and the commit, recorded in every report's `environment`."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> dict | None:
    """The commit the code ran from, and whether the code differs from it: tracked files other than
    results/, the tests, docs/ and Markdown (regenerating one result after another, or editing the
    README while a benchmark runs, must not make a result look as if other code had made it)."""
    root = Path(__file__).resolve().parents[2]  # the checkout: randbp_cli/measure/ is two below it
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results", ":(exclude)tests", ":(exclude)docs", ":(exclude,glob)**/*.md"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment(device: torch.device | None = None) -> dict:
    """Versions and hardware that change the numbers, for every report."""
    import transformers

    from .. import __version__
    from .meters import nvml_info

    device = device or torch.device("cpu")
    cuda = torch.cuda.is_available()
    env = {
        "randbp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),  # with its index: cuda:3
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cuda_version": torch.version.cuda,
        "cuda_available": cuda,
        "nvml": nvml_info(device) if cuda else {"available": False, "reason": "no CUDA device visible to torch"},
        "git": _git_commit(),
    }
    env["driver_version"] = env["nvml"].get("driver_version")
    return env
