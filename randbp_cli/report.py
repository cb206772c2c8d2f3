"""Reports: the environment block, atomic JSON files, and the rich tables the CLI prints.

Serialisation and rendering live here, apart from the measurements; every report carries a
`schema` with a version, the environment and the config, and keeps units in key names.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from rich.table import Table

from .errors import OutputError, ReportWriteError

MiB = 1 << 20


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> dict | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment(device: torch.device | None = None) -> dict:
    """Versions and hardware that change the numbers, for every report."""
    import transformers

    from . import __version__
    from .memory import nvml_info

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
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cuda_version": torch.version.cuda,
        "cuda_available": cuda,
        "nvml": nvml_info(device) if cuda else {"available": False, "reason": "no CUDA device visible to torch"},
        "git": _git_commit(),
    }
    env["driver_version"] = env["nvml"].get("driver_version")
    return env


# ---------------------------------------------------------------------------- files


def check_writable(path: str | Path) -> Path:
    """Fail early (before a long run) if the report cannot be written at `path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"output path {str(path)!r} is a directory: give a file name such as {path / 'report.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {str(path)!r}: permission denied; choose another -o/--output path")
    return path


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write JSON to a temp file beside `path`, then rename: never a half-written report."""
    path = check_writable(path)
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ReportWriteError(f"cannot write {str(path)!r}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ReportWriteError(f"could not write {str(path)!r}: {err.strerror}; nothing was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(data: dict) -> str:
    return json.dumps(data, indent=2, default=_json_default)


# ---------------------------------------------------------------------------- tables


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MiB:,.1f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}%"


def profile_table(report: dict) -> Table:
    """The `randbp profile` table: one row per case, savings and ratios vs exact."""
    results = report["results"]
    model = report.get("model", {})
    show_cuda = any(r.get("cuda") for r in results)
    show_nvml = any((r.get("nvml") or {}).get("available") for r in results)
    title = f"randbp profile: {model.get('name', '?')} ({model.get('weights', '?')} weights)"
    table = Table(title=title, caption=_profile_caption(report), title_justify="left")
    for column, justify in [("method", "left"), ("ρ", "right"), ("sketch", "left"), ("batch", "right"),
                            ("seq", "right"), ("activations MiB", "right"), ("vs exact", "right")]:
        table.add_column(column, justify=justify, no_wrap=True)
    if show_cuda:
        table.add_column("CUDA peak MiB", justify="right", no_wrap=True)
    if show_nvml:
        table.add_column("NVML peak MiB", justify="right", no_wrap=True)
    table.add_column("step ms", justify="right", no_wrap=True)
    table.add_column("time × exact", justify="right", no_wrap=True)
    for r in results:
        saving = r.get("activation_saving_vs_exact")
        row = [r["method"], "—" if r["rho"] is None else f"{r['rho']:g}", r.get("sketch") or "—",
               str(r["batch_size"]), str(r["seq_len"]), _mib(r["activation_bytes"]),
               "baseline" if r["method"] == "exact" else ("—" if saving is None else f"{-100 * saving:+.1f}%")]
        if show_cuda:
            row.append(_mib((r.get("cuda") or {}).get("peak_allocated_bytes")))
        if show_nvml:
            row.append(_mib((r.get("nvml") or {}).get("peak_used_bytes")))
        median = (r.get("step_time_s") or {}).get("median")
        ratio = r.get("time_ratio_vs_exact")
        row += ["—" if median is None else f"{1000 * median:,.1f}", "—" if ratio is None else f"{ratio:.2f}×"]
        table.add_row(*row, style="bold" if r["method"] == "exact" else None)
    return table


def _profile_caption(report: dict) -> str:
    config, env = report.get("config", {}), report.get("environment", {})
    parts = [f"device {config.get('device', '?')} ({env.get('device_name', '?')})",
             f"dtype {config.get('dtype', '?')}",
             f"median of {config.get('steps', '?')} steps after {config.get('warmup', '?')} warm-up"]
    nvml = env.get("nvml") or {}
    if config.get("device", "cpu").startswith("cuda") and not nvml.get("available"):
        parts.append(f"NVML unavailable: {nvml.get('reason', 'unknown')}")
    return "; ".join(parts)
