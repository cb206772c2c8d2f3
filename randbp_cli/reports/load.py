"""Reading a report file back: the one place a file becomes a typed report.

`load_report` (`randbp check`, `randbp report`) checks the schema and the shape (each record's
`from_dict`, record.py) and returns the typed report, or, for a benchmark script's output, a
`BenchmarkOutput`; `merge_profiles` makes several profile reports one comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from ..errors import ConfigError, ReportError
from .report import REPORTS, ProfileReport, Report
from .shapes import at, check_shape


def _embedded(value, where: str) -> Report | None:
    """The randbp report `value` is (checked like a file of its own), or None when it is none."""
    kind = REPORTS.get(value.get("schema")) if isinstance(value, dict) else None
    if kind is None:
        return None
    if not isinstance(value.get(kind.MAIN), list):
        raise ReportError(f"{where} is a {kind.SCHEMA} report without its {kind.MAIN!r} list")
    return kind.from_dict(value, where)


def _records(value) -> list[tuple[str | None, dict]] | None:
    """A list of objects, or an object of objects (each row named by its key): a table; else None."""
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        return [(None, row) for row in value]
    if isinstance(value, dict) and value and all(isinstance(row, dict) for row in value.values()):
        return list(value.items())
    return None


@dataclass
class BenchmarkOutput:
    """What a benchmark script writes (`results/bench-*.json`, `results/methods-*.json`, ...): no report
    kind of its own, but `randbp report` shows its PASS/FAIL checks, each randbp report it embeds
    (checked as a file of its own would be) and its other lists of records as plain tables."""

    schema: str
    command: str | None = None
    checks: list[dict] = field(default_factory=list)  # {"check": what was checked, "passed": bool}
    reports: list[tuple[str, Report]] = field(default_factory=list)  # (where in the file, the report)
    tables: list[tuple[str, list[tuple[str | None, dict]]]] = field(default_factory=list)  # (key, named rows)
    source: str | None = None

    KIND: ClassVar[str] = "benchmark"
    MAIN: ClassVar[str] = "checks"
    NOT_SHOWN: ClassVar[frozenset[str]] = frozenset({"schema", "command", "environment", "config", "checks"})

    @classmethod
    def from_dict(cls, data: dict) -> BenchmarkOutput | None:
        """The benchmark output `data` is, or None when it holds nothing `randbp report` can show."""
        checks = data.get("checks", [])
        check_shape(checks, list[{"check": str, "passed": bool}], "checks")
        command = data.get("command")
        check_shape(command, str | None, "command")
        output = cls(data["schema"], command, checks)
        for key, value in data.items():
            if key in cls.NOT_SHOWN:
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            embedded = [(at(at("", key), name), _embedded(item, at(at("", key), name))) for name, item in items]
            if embedded and all(report is not None for _, report in embedded):
                output.reports += embedded
            elif _records(value) is not None:
                output.tables.append((key, _records(value)))
        return output if output.checks or output.reports or output.tables else None


def load_report(path: str | Path, expect: str | None = None, *,
                if_missing: str | None = None) -> Report | BenchmarkOutput:
    """Read a randbp JSON report; `expect` = the schema it must have (name and version). Without
    `expect`, a benchmark's output is read too (`BenchmarkOutput`). `if_missing`: what to do when
    the file does not exist, said after that."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"report {str(path)!r} does not exist{': ' + if_missing if if_missing else ''}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read report {str(path)!r}: {getattr(err, 'strerror', None) or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{str(path)!r} is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}); "
                          "is it a complete randbp report?") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("randbp."):
        raise ReportError(f"{str(path)!r} is not a randbp report (no randbp 'schema' key)")
    if expect is not None and schema != expect:
        raise ReportError(f"{str(path)!r} is a {schema} report; expected {expect}")
    kind = REPORTS.get(schema)
    if kind is not None and not isinstance(data.get(kind.MAIN), list):
        raise ReportError(f"{str(path)!r} is a {schema} report without its {kind.MAIN!r} list: corrupt or truncated")
    try:
        report = kind.from_dict(data) if kind is not None else BenchmarkOutput.from_dict(data)
    except ReportError as err:  # the key path, said with the file it is in
        raise ReportError(f"{path}: {err}") from None
    if report is None:
        raise ReportError(f"{str(path)!r} has schema {schema!r}, which this randbp does not read (it reads "
                          f"{', '.join(REPORTS)}, and benchmark outputs with checks, reports or tables)")
    report.source = str(path)
    return report


def one_kind(reports: list[Report]) -> str:
    """The kind all `reports` share (a ConfigError when they mix kinds)."""
    kinds = {report.KIND for report in reports}
    if len(kinds) > 1:
        raise ConfigError(f"cannot merge reports of different kinds ({', '.join(sorted(kinds))}): "
                          "render each kind separately")
    return kinds.pop()


def merge_profiles(reports: list[ProfileReport]) -> ProfileReport:
    """Several profile reports as one comparison (results concatenated, model names joined)."""
    if len(reports) == 1:
        return reports[0]
    names = list(dict.fromkeys((report.model or {}).get("name", "?") for report in reports))
    return replace(reports[0], results=[r for report in reports for r in report.results],
                   model={**(reports[0].model or {}), "name": ", ".join(names)})
