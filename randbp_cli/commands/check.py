"""The memory regression gate: compare two `randbp.profile/1` reports case by case.

Cases match on (model, method, ρ, sketch, batch size, sequence length, dtype, device). Per metric:

  activation_bytes         exact by default (it is deterministic): any growth is a regression
  cuda.peak_allocated_bytes  growth beyond `tolerance_peak` (default 5%) is a regression
  nvml.peak_used_bytes     shown, never fails (other processes share the device)
  step_time_s.median       shown; fails only beyond `tolerance_time` when one is given

A baseline case missing from the current report, a report that is not a profile report of
this schema version, two reports with no case in common, or a guarded metric missing from either
report (`activation_bytes` always, the CUDA peak where either report has one or the case ran on
CUDA, step time when it has a tolerance) are usage problems (exit 2), not passes: a gate that
silently compares nothing protects nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from ..errors import ConfigError, ReportError
from ..reports.report import CheckResult, MetricChange, ProfileReport, ProfileResult
from ..run.methods import method_label


def case_key(report: ProfileReport, result: ProfileResult) -> tuple:
    """What a case is; the device by its type, so a baseline made on cuda:0 judges a run on cuda:3.
    Savers and the compile mode are part of it (absent in older reports: none, eager)."""
    model = result.model or (report.model or {}).get("name")
    device = None if result.device is None else result.device.split(":")[0]
    return (model, result.method, result.rho, result.sketch, tuple(result.savers or ()), result.compile,
            result.batch_size, result.seq_len, result.dtype, device)


def describe_key(key: tuple) -> str:
    model, method, rho, sketch, savers, compile_mode, batch, seq, dtype, device = key
    compiled = f" compiled ({compile_mode})" if compile_mode else ""
    return f"{model} {method_label(method, rho, sketch, savers)}{compiled} b={batch} seq={seq} {dtype} {device}"


def _nested(name: str, key: str) -> Callable[[ProfileResult], float | None]:
    def get(result: ProfileResult):
        record = getattr(result, name)
        return None if record is None else getattr(record, key)
    return get


# (how to read it from a result, the name shown, which tolerance gates it (None: informational),
#  its key in the report)
_METRICS = [
    (lambda r: r.activation_bytes, "activation_bytes", "activation", "activation_bytes"),
    (_nested("cuda", "peak_allocated_bytes"), "cuda_peak_bytes", "peak", "cuda.peak_allocated_bytes"),
    (_nested("nvml", "peak_used_bytes"), "nvml_peak_bytes", None, "nvml.peak_used_bytes"),
    (_nested("step_time_s", "median"), "step_time_s", "time", "step_time_s.median"),
]


def _guarded(tolerance_name: str | None, tolerances: dict, results: list[ProfileResult]) -> bool:
    """Whether the gate judges this metric for these results (the same case in each report): then
    a report without it is an error, never a pass."""
    if tolerance_name == "activation":
        return True
    if tolerance_name is None or tolerances.get(tolerance_name) is None:
        return False
    if tolerance_name == "peak":  # the CUDA peak exists only on CUDA
        return any((r.device or "").startswith("cuda") or r.cuda is not None for r in results)
    return True


def require_guarded(report: ProfileReport, result: ProfileResult, tolerances: dict,
                    results: list[ProfileResult] | None = None) -> None:
    """A ReportError naming the file, the case and the metric, when `result` lacks a metric the
    gate judges (`results`: the same case in every report compared, which decide what is judged)."""
    for read, _, tolerance_name, key in _METRICS:
        if _guarded(tolerance_name, tolerances, results or [result]) and read(result) is None:
            index = next(i for i, r in enumerate(report.results) if r is result)
            raise ReportError(f"{report.source or 'the new profile report'}: results[{index}] "
                              f"({describe_key(case_key(report, result))}) has no {key}, which the gate guards; "
                              "profile the case again (and --update the baseline on purpose)")


def require_judgeable(report: ProfileReport) -> None:
    """Refuse, as a baseline, a report the gate could not judge against (`check --update`)."""
    if report.status == "interrupted" or not report.results:
        raise ReportError(f"{report.source or 'the report'} is {'an interrupted run' if report.results else 'empty'}"
                          ": a baseline must hold every case it guards; profile them again, to the end")
    for result in report.results:
        require_guarded(report, result, {"peak": 0.0})


def environment_warnings(current: ProfileReport, baseline: ProfileReport) -> list[str]:
    """Differences that change the numbers even when the code does not."""
    warnings = []
    env_now, env_base = current.environment or {}, baseline.environment or {}
    for key, label in (("torch", "torch version"), ("device", "device type"), ("transformers", "transformers version")):
        now, base = env_now.get(key), env_base.get(key)
        if key == "device":  # cuda:0 and cuda:3 are the same kind of device
            now, base = (None if value is None else value.split(":")[0] for value in (now, base))
        if now != base:
            warnings.append(f"{label} differs: baseline {base!r}, now {now!r}")
    dtype_now = (current.config or {}).get("dtype")
    dtype_base = (baseline.config or {}).get("dtype")
    if dtype_now != dtype_base:
        warnings.append(f"dtype differs: baseline {dtype_base!r}, now {dtype_now!r}")
    return warnings


def compare_reports(current: ProfileReport, baseline: ProfileReport, *, tolerance_activation: float = 0.0,
                    tolerance_peak: float = 0.05, tolerance_time: float | None = None) -> CheckResult:
    """Case-by-case comparison; raises ReportError for usage problems (see module doc)."""
    tolerances = {"activation": tolerance_activation, "peak": tolerance_peak, "time": tolerance_time}
    now = {case_key(current, r): r for r in current.results}
    base = {case_key(baseline, r): r for r in baseline.results}
    common = [k for k in base if k in now]
    if not base:
        raise ReportError("the baseline holds no case: make it again (randbp check CURRENT --baseline BASELINE "
                          "--update)")
    if not common:
        raise ReportError("the reports have no case in common (model, method, ρ, sketch, savers, compile mode, "
                          f"batch, seq, dtype, device; the baseline's first: {describe_key(next(iter(base)))}): "
                          "profile the baseline's configuration, or --update the baseline on purpose")
    missing = [k for k in base if k not in now]
    if missing:
        shown = "; ".join(describe_key(k) for k in missing[:3])
        shown += f"; ... ({len(missing)} in all)" if len(missing) > 3 else ""
        raise ReportError(f"the current report lacks baseline case(s): {shown}; profile the same configuration, "
                          "or --update the baseline on purpose")
    result = CheckResult(matched=len(common), new_cases=[describe_key(k) for k in now if k not in base],
                         warnings=environment_warnings(current, baseline))
    for key in common:
        for report, case in ((baseline, base[key]), (current, now[key])):
            require_guarded(report, case, tolerances, [base[key], now[key]])
        for read, metric, tolerance_name, _ in _METRICS:
            old, new = read(base[key]), read(now[key])
            if old is None or new is None:
                continue
            tolerance = tolerances.get(tolerance_name) if tolerance_name else None
            if tolerance is None:
                status, limit = "info", None
            else:
                limit = old * (1 + tolerance)
                if new > limit:
                    status = "regressed"
                elif new < old * (1 - tolerance) or (tolerance == 0 and new < old):
                    status = "improved"
                else:
                    status = "unchanged"
            result.changes.append(MetricChange(describe_key(key), metric, old, new, limit, status))
    return result


def parse_tolerance(text: str | None, option: str) -> float | None:
    """'5%' -> 0.05, '0.05' -> 0.05; None stays None."""
    if text is None:
        return None
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{option} takes a fraction or a percentage such as 5% (got {text!r})") from None
    if not value >= 0:
        raise ConfigError(f"{option} must not be negative (got {text!r})")
    return value
