"""A report table that never cuts a number: `ReportTable`, fitting it to a width, and Markdown.

rich, given too little width, elides cells ("912,605,2…"). `fit` instead lets headers wrap at
spaces, then splits the columns over several tables (the row's key columns repeated), and, when
even one value column beside the keys does not fit, prints each row as `header: value` lines.
Widths here are rich's layout: one border per column plus one, and one space of padding either
side of every cell.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text


class ReportTable(Table):
    """A rich table whose first `keys` columns name a row (method, ρ, sketch …): when the table is too
    wide for the terminal, `fit` repeats them in every part it splits the other columns into."""

    def __init__(self, *args, keys: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys = keys


def add_columns(table: Table, names: list[str], left: tuple[str, ...]) -> None:
    """Columns named `names`, right-aligned (numbers) but for `left`; cells never wrap."""
    for name in names:
        table.add_column(name, justify="left" if name in left else "right", no_wrap=True)


# ---------------------------------------------------------------------------- fitting a width

# A cell is never cut: rich, given too little width, elides numbers ("912,605,2…"). `fit` instead
# lets headers wrap at spaces, then splits the columns over several tables (the row's key columns
# repeated), and, when even one value column beside the keys does not fit, prints each row as
# `header: value` lines. Widths here are rich's layout: one border per column plus one, and one
# space of padding either side of every cell.


def _cells(column) -> list[str]:
    return [str(cell) for cell in column.cells]


def _width(column, wrap_header: bool) -> int:
    header = str(column.header)
    header_width = max(map(cell_len, header.split() or [""])) if wrap_header else cell_len(header)
    return max([header_width, *map(cell_len, _cells(column))])


def _table_width(columns, wrap_header: bool) -> int:
    return 1 + sum(_width(c, wrap_header) + 3 for c in columns)


def _part(table: Table, columns: list, title: str | None, caption: str | None, wrap_header: bool) -> Table:
    """A copy of `table` with only `columns` (each at a fixed width when headers wrap)."""
    part = Table(title=title, caption=caption, title_justify=table.title_justify,
                 caption_justify=table.caption_justify)
    for column in columns:
        part.add_column(column.header, justify=column.justify, no_wrap=not wrap_header,
                        width=_width(column, True) if wrap_header else None)
    for index, row in enumerate(table.rows):
        part.add_row(*[column._cells[index] for column in columns], style=row.style)
    return part


def _records(table: Table) -> Text:
    """Each row as `header: value` lines (the narrowest form: every value whole, one per line)."""
    text = Text()
    if table.title:
        text.append(f"{table.title}\n", style="bold")
    headers = [" ".join(str(c.header).split()) for c in table.columns]
    for index, row in enumerate(table.rows):
        text.append("\n")
        for header, column in zip(headers, table.columns):
            text.append(f"{header}: ", style="dim")
            text.append(f"{column._cells[index]}\n", style=row.style or "")
    if table.caption:
        text.append(f"\n{table.caption}\n", style="italic")
    return text


def fit(table: Table, width: int | None) -> list:
    """`table` as renderables no wider than `width` (None: any width), every cell whole, and each
    title on one line where the width allows it."""
    return [_title_width(part, width) for part in _fit(table, width)]


def _title_width(part, width: int | None):
    if isinstance(part, Table) and part.title:
        part.min_width = min(cell_len(str(part.title)), width or 1 << 16)
    return part


def _fit(table: Table, width: int | None) -> list:
    columns = list(table.columns)
    if width is None or _table_width(columns, wrap_header=False) <= width:
        return [table]
    if _table_width(columns, wrap_header=True) <= width:
        return [_part(table, columns, table.title, table.caption, wrap_header=True)]
    keys, values = columns[:getattr(table, "keys", 1)], columns[getattr(table, "keys", 1):]
    groups: list[list] = []
    for column in values:
        if groups and _table_width(keys + groups[-1] + [column], wrap_header=True) <= width:
            groups[-1].append(column)
        elif _table_width(keys + [column], wrap_header=True) <= width:
            groups.append([column])
        else:
            return [_records(table)]
    if not groups:  # nothing beside the keys, and the keys alone are too wide
        return [_records(table)]
    return [_part(table, keys + group, f"{table.title} ({number}/{len(groups)})" if table.title else None,
                  table.caption if number == len(groups) else None, wrap_header=True)
            for number, group in enumerate(groups, 1)]


def table_to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with the rich table's headers and cells."""

    def clean(cell) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    headers = [clean(c.header) for c in table.columns]
    align = ["---:" if c.justify == "right" else "---" for c in table.columns]
    rows = list(zip(*[[clean(cell) for cell in c.cells] for c in table.columns]))
    lines = [f"| {' | '.join(headers)} |", f"| {' | '.join(align)} |"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    title = f"**{table.title}**\n\n" if table.title else ""
    caption = "\n\n" + "  \n".join(f"_{line}_" for line in str(table.caption).splitlines()) if table.caption else ""
    return title + "\n".join(lines) + caption
