"""Every figure the README quotes from a results file is read from that file (issue 21).

How a quote is tied to its file: right above a table, or above a paragraph or bullet list (a block
runs to the next blank line), the README carries an HTML comment, which Markdown does not render:

    <!-- figures: results/bench-savers-cpu.json results/other.json; not from a file: 0.45 1.05 -->

Every number in the block must then be a value of one of the named files, at the precision and in
the unit the README prints it: "870.3" under "activations MiB" is 912,605,252 bytes, "-14.5%" a
saving of 0.145, "4,093" under "step ms" a step of 4.093 s, "0.96×" a ratio of 0.9587. The unit is
the one written after the number (%, ×, MiB, ms, s, µs, points; a range such as 0.79–0.93× takes its
end's), else the one in its table column's header. A few derived figures count as read from a file
too, each computed here the way the README describes it: a case against exact's in the same list
(219 MiB less, 3.1× the batch, −18% peak: `COMPARED`), a mean, min or max over per-layer records,
a count of records or of passed checks, and the few in `_own` and `_EXTRA`. Numbers that are not
measurements (a target, a threshold, a constant of the code) are listed after "not from a file:",
in the open. Code spans, link targets and a table's header row are not read.

A table row must moreover come from one record of its files (a profile case, a fine-tune run, a
summary entry; what no record holds, such as the config, counts for any row), or from two where
the tag says "rows from two records" (a row that puts 128 and 512 tokens side by side).

`<!-- figures: unchecked: WHERE -->` marks a block that quotes figures no file in results/ holds
(the file as an earlier commit had it); WHERE must name the commit.
`<!-- figures: none: WHY -->` marks a block that names a results file but quotes no figure (its
numbers are, say, exit codes); WHY must be said.

Nothing escapes the tags: a paragraph, list or table that names a file under results/ and holds a
number outside code, and a table right after a paragraph that names one, must be tagged.
"""

import json
import math
import re
import statistics
from functools import cache
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MIB = 2**20

TAG = re.compile(r"^<!--\s*figures:\s*(.*?)\s*-->$")
NAMES_A_RESULT = re.compile(r"results/[\w./-]+\.(?:json|log)")
# A number on its own (not part of a word, an identifier such as fp32, layer.0, gelu:2 or sm_80, a
# commit hash or a version), with thousands separators (1,984) and a decimal part; then, for a
# range, "–" and its end; then the unit.
_ONE = r"(?<![\w.:§^])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w]|[.,]\d)"
NUMBER = re.compile(rf"({_ONE})(?:–({_ONE}))?(?:\s?(%|×|MiB|GiB|ms|µs|s\b|points?\b))?")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
COMMENT = re.compile(r"<!--.*?-->")

# What a printed unit says a number is; a value read from a file may be printed as any of these,
# scaled as RAW says (870.3 MiB is 912,605,252 bytes; 4.8% is 0.048 or 4.8; 4,093 ms is 4.093 s).
KIND = {None: "plain", "×": "plain", "s": "plain", "µs": "plain", "%": "%", "points": "points", "point": "points",
        "MiB": "MiB", "GiB": "GiB", "ms": "ms"}
RAW = {"plain": (1,), "%": (100, 1), "points": (100, 1), "MiB": (1 / MIB, 1), "GiB": (1 / 2**30, 1), "ms": (1000, 1)}
# Keys the README compares between a case and exact's, and how: "-" a difference, "/" a ratio (and
# 1 − ratio, a saving).
COMPARED = {"activation_bytes": "-/", "activation_peak_bytes": "-/", "peak_allocated_bytes": "-/",
            "max_batch_size": "/", "max_seq_len": "/", "value": "-", "best": "-"}
# Keys holding raw samples (timings, NVML readings): the README quotes their summaries, not them.
SKIPPED = {"samples"}


# ---- the README's blocks and their numbers ------------------------------------------------------

def _blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every block outside fenced code; blocks end at blank lines."""
    blocks, current, start, fenced = [], [], 0, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            if current:
                blocks.append((start, current))
            current = []
            continue
        if fenced:
            continue
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            blocks.append((start, current))
            current = []
    if current:
        blocks.append((start, current))
    return blocks


def _is_table(lines: list[str]) -> bool:
    return lines[0].lstrip().startswith("|")


def _numbers(text: str, unit: str | None = None) -> list[tuple[str, str | None]]:
    """(number as printed, its unit) for each number in prose or a table cell; `unit` where none is
    written after it."""
    text = COMMENT.sub(" ", LINK_TARGET.sub("]", CODE_SPAN.sub(" ", text)))
    found = []
    for first, end, written in NUMBER.findall(text):
        found += [(number, written or unit) for number in (first, end) if number]
    return found


def _figures(body: list[tuple[int, str]]) -> list[tuple[int, str, str | None]]:
    """(line number, number, unit) for every number of a block; a table's header row gives the
    units of its columns and is not read itself."""
    if not body or not body[0][1].lstrip().startswith("|"):
        return [(n, number, unit) for n, line in body for number, unit in _numbers(line)]
    header = body[0][1].strip().strip("|").split("|")
    units = [next((u for u in ("MiB", "ms", "points") if re.search(rf"\b{u}\b", h)), None) for h in header]
    figures = []
    for n, row in body[2:]:
        for cell, unit in zip(row.strip().strip("|").split("|"), units):
            figures += [(n, number, u) for number, u in _numbers(cell, unit)]
    return figures


def _tagged_blocks(text: str):
    """(line number of the tag, its spec, [(line number, text)] of the block it tags)."""
    for start, lines in _blocks(text):
        match = TAG.match(lines[0].strip())
        if match:
            yield start, match.group(1), list(enumerate(lines[1:], start + 1))


# ---- what a results file holds ------------------------------------------------------------------
#
# A file's figures come in records: each element of a list of dicts (a profile case, a fine-tune
# run, a check, a variance record) and each value of a dict of two or more dicts (the savers
# benchmark's reports, the seeds' summary) is one, holding the numbers under it that are not in a
# record of their own. What is in no record (config, environment, command) is loose. Figures the
# README derives are records of their own too (a group's mean, a case against exact's), so that a
# table row can be traced to the one or two records it was read from.

LOOSE = -1


def _numbers_in(node):
    """Every number under a node, numbers inside its strings included, not descending into records."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in SKIPPED and not _is_record_group(value):
                yield from _numbers_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _numbers_in(value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield float(node)
    elif isinstance(node, str):
        yield from (float(number.replace(",", "")) for number, _ in _numbers(node))


def _is_record_group(node) -> bool:
    """A list of dicts, or a dict of two or more dicts: its items are records."""
    if isinstance(node, list):
        return bool(node) and all(isinstance(item, dict) for item in node)
    return isinstance(node, dict) and len(node) > 1 and all(isinstance(v, dict) for v in node.values())


def _groups(node):
    """Every record group in a document, as a list of its records."""
    if isinstance(node, dict):
        if _is_record_group(node):
            yield list(node.values())
        for key, value in node.items():
            if key not in SKIPPED:
                yield from _groups(value)
    elif isinstance(node, list):
        if _is_record_group(node):
            yield node
        for value in node:
            yield from _groups(value)


def _raw(values) -> list[tuple[str, float]]:
    """Numbers read from a file, as they may print: in any unit, scaled as RAW says."""
    return [(kind, value * scale) for value in values for kind, scales in RAW.items() for scale in scales]


def _vs_exact(record: dict, records: list[dict]):
    """The record against each exact record of its list (a method "exact" case or run, with or
    without savers), for the COMPARED keys: exact − it (in MiB for bytes, in points for
    accuracy), it / exact (0.68×, 4.8%) and 1 − it / exact (−18%)."""
    for exact in (r for r in records if r.get("method") == "exact"):
        for key, how in COMPARED.items():
            for a, b in _pairs(record, exact, key):
                if "-" in how:
                    yield ("MiB", (b - a) / MIB) if key.endswith("bytes") else ("points", 100 * (b - a))
                if "/" in how and b:
                    yield from (("plain", a / b), ("%", 100 * a / b), ("%", 100 * (1 - a / b)))


def _pairs(record: dict, exact: dict, key: str):
    """The values of `key` in both records, at the top level or one level down (cuda, budget, best)."""
    for a, b in ((record, exact), *((record[k], exact.get(k)) for k in record if isinstance(record[k], dict))):
        if isinstance(b, dict) and isinstance(a.get(key), (int, float)) and isinstance(b.get(key), (int, float)):
            yield a[key], b[key]


def _own(record: dict):
    """What a profile case gives besides its numbers: each kind's share of its activation bytes (29%
    are linear inputs), its bytes over the least sketching can keep at its ρ (the "× limit" column),
    and how far its fastest and slowest step lie from its median."""
    kinds = record.get("activation_bytes_by_kind")
    if isinstance(kinds, dict) and record.get("activation_bytes"):
        yield from (("%", 100 * v / record["activation_bytes"]) for v in kinds.values() if isinstance(v, (int, float)))
    if record.get("activation_limit_bytes"):
        yield "plain", record["activation_bytes"] / record["activation_limit_bytes"]
    steps = record.get("step_time_s")
    if isinstance(steps, dict) and steps.get("median"):
        yield from (("%", 100 * (steps[end] / steps["median"] - 1)) for end in ("min", "max"))


def _aggregates(records: list[dict]):
    """For the records, and for each group of them that agree on one or two text fields (per layer,
    per sketch, per layer and sketch): a record of each numeric field's mean, min and max."""
    text_fields = sorted({k for r in records for k, v in r.items() if isinstance(v, str)})
    for fields in (c for n in range(min(2, len(text_fields)) + 1) for c in combinations(text_fields, n)):
        groups: dict[tuple, list[dict]] = {}
        for record in records:
            groups.setdefault(tuple(record.get(f) for f in fields), []).append(record)
        for group in groups.values():
            numeric = {k for r in group for k, v in r.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            figures = [float(len(group))]
            for key in numeric:
                values = [r[key] for r in group if isinstance(r.get(key), (int, float))]
                figures += [statistics.fmean(values), min(values), max(values)]
            yield _raw(figures)


def _seed_gaps(document):
    """finetune_seeds: per run, its best accuracy minus exact's on each seed, and its spread."""
    runs = document.get("runs") or {}
    exact = {r["seed"]: r["best"] for r in runs.get("exact", [])}
    for records in runs.values():
        bests = [r["best"] for r in records]
        gaps = [max(bests) - min(bests), *(r["best"] - exact[r["seed"]] for r in records if r["seed"] in exact)]
        yield [("points", 100 * gap) for gap in gaps]


def _variance_steps(document):
    """variance: per record, N/B (rows the sketch sees per real token row), tokens per example (N
    over the batch size) and a measurement's standard error relative to it; then as `_aggregates`."""
    batch = (document.get("config") or {}).get("batch_size") or 1
    records = [dict(r, rows_per_real_row=r["rows"] / r["real_rows"], tokens_per_example=r["rows"] / batch,
                    relative_se=r["d2_rmm_se"] / r["d2_rmm_measured"])
               for r in document.get("records", []) if r.get("real_rows") and r.get("d2_rmm_measured")]
    return _aggregates(records) if records else []


def _estimators_vs_gaussian(document):
    """methods: per ρ and estimator, its D²_RMM over the Gaussian sketch's on the same layer
    (measured and closed form) and its ratio to D²_SGD, averaged over the layers; and each record's
    |measured − closed form| in standard errors, with how many records lie under each."""
    parts = (document.get("variance") or {}).values()
    for part in parts:
        by_layer: dict[str, dict[str, dict]] = {}
        for r in part["records"]:
            by_layer.setdefault(r["layer"], {})[r["sketch"]] = r
        for sketch in {s for layer in by_layer.values() for s in layer}:
            yield _raw(statistics.fmean(layer[sketch][key] / (layer["gaussian"][key] if key != "ratio" else 1)
                                        for layer in by_layer.values())
                       for key in ("d2_rmm_measured", "d2_rmm_theory", "ratio"))
    records = [r for part in parts for r in part["records"]]
    z = sorted(abs(r["d2_rmm_measured"] - r["d2_rmm_theory"]) / r["d2_rmm_se"] for r in records)
    yield _raw([*z, *range(1, len(z) + 1)])


_EXTRA = {
    "finetune-synthetic-seeds-cpu.json": _seed_gaps,
    "variance-synthetic-cpu.json": _variance_steps,
    "methods-roberta-base-cpu.json": _estimators_vs_gaussian,
}


def _records_of(path: Path) -> tuple[list[list[tuple[str, float]]], list[tuple[str, float]]]:
    """(the (kind, value) figures of each record, real or derived; the loose figures) of a file."""
    if path.suffix != ".json":  # a log: each line is a record
        lines = path.read_text().splitlines()
        return [_raw(float(n.replace(",", "")) for n, _ in _numbers(line)) for line in lines], []
    document = json.loads(path.read_text())
    records, loose = [], list(_numbers_in(document))
    for group in _groups(document):
        for record in group:
            records.append([*_raw(_numbers_in(record)), *_vs_exact(record, group), *_own(record)])
        if all(isinstance(r.get("layer"), str) for r in group):  # per-layer measurements
            records += _aggregates(group)
        loose += [len(group), sum(1 for r in group if r.get("passed") is True)]  # 22 of 22 checks
    records += _EXTRA.get(path.name, lambda _: [])(document)
    return records, _raw(loose)


def _printed(scaled: float, decimals: int) -> set[int]:
    """How a value prints with this many decimals, as an integer of its digits (both, at a tie)."""
    scaled = abs(scaled) * 10**decimals
    return {math.floor(scaled + 0.5 + 1e-9), math.ceil(scaled - 0.5 - 1e-9)}


@cache
def _file(spec: str) -> tuple[list[list[tuple[str, float]]], list[tuple[str, float]]]:
    path = ROOT / spec
    assert path.is_file(), f"the README cites {spec}, which does not exist"
    return _records_of(path)


@cache
def _index(spec: str, kind: str, decimals: int) -> dict[int, set[int]]:
    """For the figures of this file that print as `kind`: their digits at this many decimals -> the
    records (LOOSE for none) they come from."""
    records, loose = _file(spec)
    index: dict[int, set[int]] = {}
    for number, figures in [*enumerate(records), (LOOSE, loose)]:
        for value in {value for k, value in figures if k == kind}:
            for digits in _printed(value, decimals):
                index.setdefault(digits, set()).add(number)
    return index


def _sources(number: str, unit: str | None, files: list[str]) -> set[tuple[str, int]]:
    """The (file, record) pairs a printed figure can come from."""
    whole, _, fraction = number.replace(",", "").partition(".")
    decimals, digits = len(fraction), int(whole + fraction)
    return {(f, r) for f in files for r in _index(f, KIND[unit], decimals).get(digits, ())}


def _parse_tag(spec: str) -> tuple[list[str], set[str], int]:
    """(files, numbers not from a file, how many records one table row may come from)."""
    files, *parts = [part.strip() for part in spec.split(";")]
    exempt, records = set(), 1
    for part in parts:
        if part.startswith("not from a file:"):
            exempt |= set(part.removeprefix("not from a file:").split())
        else:
            assert part == "rows from two records", f"unknown tag part {part!r}"
            records = 2
    return files.split(), exempt, records


def _held_by(sources: list[set[tuple[str, int]]], most: int) -> bool:
    """Whether at most `most` (1 or 2) records, loose figures aside, hold every figure of a row."""
    needed = [s for s in sources if not any(r == LOOSE for _, r in s)]
    if not needed:
        return True
    if most == 1:
        return bool(set.intersection(*needed))
    for first in needed[0]:
        rest = [s for s in needed if first not in s]
        if not rest or set.intersection(*rest):
            return True
    return False


def misquoted(text: str) -> list[str]:
    """Every number in a tagged block that none of its files holds, and every table row whose
    figures no one or two records of its files hold together, as 'README.md:LINE: ...'."""
    problems = []
    for _, spec, body in _tagged_blocks(text):
        if spec.startswith(("unchecked:", "none:")):
            continue
        files, exempt, most = _parse_tag(spec)
        rows: dict[int, list[set]] = {}
        for line, number, unit in _figures(body):
            if number in exempt:
                continue
            sources = _sources(number, unit, files)
            if not sources:
                problems.append(f"README.md:{line}: {number}{' ' + unit if unit else ''} is not in {' '.join(files)}")
            elif body[0][1].lstrip().startswith("|"):
                rows.setdefault(line, []).append(sources)
        problems += [f"README.md:{line}: no {'two records' if most == 2 else 'one record'} of "
                     f"{' '.join(files)} holds all of the row's figures"
                     for line, sources in rows.items() if not _held_by(sources, most)]
    return problems


# ---- the tests ----------------------------------------------------------------------------------

def test_the_readme_tags_its_quoted_figures():
    assert sum(1 for _ in _tagged_blocks(README.read_text())) >= 40, "the README's figures lost their tags"


def test_every_tagged_figure_is_read_from_its_file():
    problems = misquoted(README.read_text())
    assert not problems, "\n".join(problems)


def test_tags_name_files_and_reasons():
    for line, spec, body in _tagged_blocks(README.read_text()):
        assert body, f"README.md:{line}: a tag with nothing under it"
        if spec.startswith("unchecked:"):
            assert re.search(r"\b[0-9a-f]{7,40}\b", spec), f"README.md:{line}: say which commit holds them"
        elif spec.startswith("none:"):
            assert spec.removeprefix("none:").strip(), f"README.md:{line}: say why nothing here is a figure"
        else:
            files, _, _ = _parse_tag(spec)
            assert files and all(NAMES_A_RESULT.fullmatch(f) for f in files), f"README.md:{line}: {spec}"


def test_no_quote_of_a_result_escapes_the_tags():
    """A block that names a results file and shows a number must be tagged; so must a table that a
    paragraph naming a results file introduces."""
    untagged, previous_names = [], False
    for start, lines in _blocks(README.read_text()):
        tagged = bool(TAG.match(lines[0].strip()))
        names = bool(NAMES_A_RESULT.search(COMMENT.sub("", "\n".join(lines))))
        shows_numbers = any(_numbers(line) for line in lines)
        introduced = _is_table(lines) and previous_names
        if not tagged and shows_numbers and (names or introduced) and not lines[0].startswith("#"):
            untagged.append(f"README.md:{start}: {lines[0][:80]}")
        previous_names = names and not _is_table(lines)
    assert not untagged, "blocks that quote results without a figures tag:\n" + "\n".join(untagged)


def test_a_wrong_digit_fails():
    """The check can fail: one digit changed in a tagged table, or in tagged prose, is reported with
    its line."""
    text = README.read_text()
    lines = text.splitlines()
    table_row = next(n for _, spec, body in _tagged_blocks(text) if spec == "results/bench-savers-cpu.json"
                     for n, row in body if row.startswith("| exact | 870.3 |"))
    prose = next(n for _, spec, body in _tagged_blocks(text) if spec.startswith("results/bench-profile-targets")
                 for n, line in body if "balanced 0.79–0.93×, countsketch 0.76–0.90×" in line)
    lines[table_row - 1] = lines[table_row - 1].replace("870.3", "870.4", 1)
    lines[prose - 1] = lines[prose - 1].replace("0.79–0.93×", "0.79–0.94×", 1)
    assert sorted(misquoted("\n".join(lines))) == sorted([
        f"README.md:{table_row}: 870.4 MiB is not in results/bench-savers-cpu.json",
        f"README.md:{prose}: 0.94 × is not in results/bench-profile-targets-cpu.json"])
