"""BENCHMARKS.md as data: the section files of benchmarks/results/, their checks, their rendering, and the writer
benchmark scripts call to store the rows they measured.

A section file `benchmarks/results/NNN-slug.json` (the format is described in benchmarks/results/README.md) holds one
`##` or `###` section: its level, title and an ordered list of blocks (prose, the machine line, commands, tables).
BENCHMARKS.md is `header.md` followed by every section file in the order of their names; render_benchmarks.py
writes it and `--check`s it; import_markdown_section.py turns markdown sections into section files. Scripts run as
`python benchmarks/x.py`, so they import this module as `_results`.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = "header.md"
SECTION_FILE = re.compile(r"^(\d{3})-([a-z0-9]+(?:-[a-z0-9]+)*)\.json$")
BLOCK_KINDS = ("text", "machine", "command", "table")
ALIGN_RULE = {None: "---", "left": ":---", "right": "---:", "center": ":---:"}
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
# a prose line that names a command: "Command: ...", or one opening with a command in backticks (`python ...`);
# the same rule as check_docs.py applies to the rendered text
COMMAND_TEXT = re.compile(r"^(command|`(\S+=\S+ )*(\.venv/bin/)?(python|vitlab|make|torchrun)\b)", re.IGNORECASE)

Section = dict[str, Any]


def text_of(value: str | list[str]) -> str:
    """A text field: one string, or a list of lines (how multi-line text is stored, for readable diffs)."""
    return "\n".join(value) if isinstance(value, list) else value


def section_files(results: Path = RESULTS) -> list[Path]:
    """The section files of `results`, in the order BENCHMARKS.md shows them (their names' order)."""
    return sorted(p for p in results.glob("*.json") if SECTION_FILE.match(p.name))


def load(path: Path) -> Section:
    return json.loads(path.read_text())


def machine_flags(header: str) -> dict[str, frozenset[str]]:
    """The machines of the header's `## Machines` list, each with the flags written in backticks in its entry
    (an entry is a `- **name**: ...` line and its indented continuation lines)."""
    body = header.split("\n## Machines\n", 1)[1].split("\n## ", 1)[0] if "\n## Machines\n" in header else ""
    machines: dict[str, frozenset[str]] = {}
    for entry in re.split(r"\n(?=- \*\*)", body):
        match = re.match(r"- \*\*(.+?)\*\*", entry)
        if match:
            flags = " ".join(re.findall(r"`([^`]*)`", entry.replace("\n  ", " ")))
            machines[match.group(1)] = frozenset(flags.split())
    return machines


def render_table(table: dict[str, Any]) -> str:
    """A markdown table: the header row, the alignment rule, one line per row; cells are markdown as stored."""
    def row(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    align = table.get("align") or [None] * len(table["columns"])
    lines = [row(table["columns"]), "|" + "|".join(ALIGN_RULE[a] for a in align) + "|"]
    return "\n".join(lines + [row(r) for r in table["rows"]])


def render_block(block: dict[str, Any]) -> str:
    kind = next(k for k in BLOCK_KINDS if k in block)
    if kind == "text":
        return text_of(block["text"])
    if kind == "machine":
        return "Machine: " + text_of(block["machine"])
    if kind == "command":
        return f"```{block.get('lang', 'bash')}\n{text_of(block['command'])}\n```"
    return render_table(block["table"])


def render_section(section: Section) -> str:
    """The section's heading, then its blocks, each after one blank line."""
    return "#" * section["level"] + " " + section["title"] + "\n" + "".join(
        "\n" + render_block(block) + "\n" for block in section["blocks"])


def render(results: Path = RESULTS) -> str:
    """BENCHMARKS.md: header.md, then each section file, one blank line apart."""
    return (results / HEADER).read_text() + "".join("\n" + render_section(load(p)) for p in section_files(results))


def _has_command(section: Section) -> bool:
    return any("command" in b or any(COMMAND_TEXT.match(line) for line in text_of(b.get("text", "")).split("\n"))
               for b in section["blocks"])


def _machines(section: Section) -> list[str]:
    return [text_of(b["machine"]) for b in section["blocks"] if "machine" in b]


def _block_problems(block: dict[str, Any]) -> list[str]:
    kinds = [k for k in BLOCK_KINDS if k in block]
    if len(kinds) != 1 or set(block) - {kinds[0], "lang"}:
        return [f"a block needs exactly one of {BLOCK_KINDS}: {sorted(block)}"]
    if kinds == ["table"]:
        table = block["table"]
        if not {"columns", "rows"} <= set(table) <= {"columns", "rows", "align"}:
            return [f"a table needs 'columns' and 'rows' (and may have 'align'): {sorted(table)}"]
        if len({len(table["columns"]), *map(len, table["rows"]), len(table.get("align") or table["columns"])}) != 1:
            return [f"table {table['columns']} has rows or an align list of another width"]
    return []


def problems(results: Path = RESULTS) -> list[str]:
    """One line per section file that breaks the format: unknown keys or block kinds, a bad level, rows of the
    wrong width, a machine line that does not open with a machine of the header's list and a date, a table whose
    section (or the `##` section above it) names no command or no machine line."""
    names = list(machine_flags((results / HEADER).read_text()))
    found, parent, slugs = [], None, set()
    for path in section_files(results):
        where = path.name
        try:
            section = load(path)
        except json.JSONDecodeError as error:
            found.append(f"{where}: not valid JSON: {error}")
            continue
        slug = SECTION_FILE.match(path.name).group(2)
        if slug in slugs:
            found.append(f"{where}: slug {slug!r} is used twice")
        slugs.add(slug)
        if set(section) != {"level", "title", "blocks"} or section["level"] not in (2, 3):
            found.append(f"{where}: needs exactly 'level' (2 or 3), 'title' and 'blocks'")
            continue
        if section["level"] == 3 and parent is None:
            found.append(f"{where}: a level-3 section before any level-2 section")
        parent = section if section["level"] == 2 else parent
        found += [f"{where}: {problem}" for block in section["blocks"] for problem in _block_problems(block)]
        for line in _machines(section):
            if not any(line.startswith(name) for name in names) or not DATE.search(line):
                found.append(f"{where}: machine line {line[:60]!r} must open with one of {names} and give a date")
        if any("table" in b for b in section["blocks"]):
            scope = [section] if section is parent else [section, parent]
            if not any(_has_command(s) for s in scope):
                found.append(f"{where}: a table without a command (a 'command' block or a 'Command: ...' text)")
            if not any(_machines(s) for s in scope):
                found.append(f"{where}: a table without a 'machine' block")
    return found


def _dumps(value: Any, indent: str = "", key: str = "") -> str:
    """JSON with one table row per line (and columns / align on one line each), everything else indented."""
    if isinstance(value, dict) and value:
        items = [f'{indent}  {json.dumps(k)}: {_dumps(v, indent + "  ", k)}' for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and key not in ("columns", "align"):
        one_line = key == "rows"
        items = [indent + "  " + (json.dumps(v, ensure_ascii=False) if one_line else _dumps(v, indent + "  "))
                 for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it over `path`: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_section(path: Path, section: Section) -> None:
    write_atomic(path, _dumps(section) + "\n")


def current_machine(header: Path = RESULTS / HEADER) -> str:
    """The machine of the Machines list this CPU is: the one with the most flags that this CPU all has."""
    from vitlab.profiling.cpu import cpu_flags, cpu_flags_text

    have = cpu_flags()
    fits = [(len(flags), name) for name, flags in machine_flags(header.read_text()).items() if flags <= have]
    if not fits:
        raise ValueError(f"this CPU (flags {cpu_flags_text()!r}) is none of the machines listed in {header}: "
                         "add it there with its CPU model and flags")
    return max(fits)[1]


def machine_line(threads: int, note: str = "", header: Path = RESULTS / HEADER) -> str:
    """'<machine>, <UTC date>, N thread(s), load average L[; note].': the text of a machine block, for a run that
    just finished on this CPU."""
    load = os.getloadavg()[0]
    date = datetime.now(timezone.utc).date().isoformat()
    text = f"{current_machine(header)}, {date}, {threads} thread{'s' if threads != 1 else ''}, load average {load:.1f}"
    return text + (f"; {note}" if note else "") + "."


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The table as a script prints it (the same text BENCHMARKS.md shows)."""
    return render_table({"columns": list(columns), "rows": [[str(c) for c in r] for r in rows]})


def save_rows(slug: str, columns: Sequence[str], rows: Sequence[Sequence[object]], *, machine: str,
              key_columns: int = 1, table: int = 0, results: Path = RESULTS,
              benchmarks: Path | None = BENCHMARKS) -> Path:
    """Store a run's rows in table number `table` of section `slug` (benchmarks/results/NNN-slug.json) and set the
    section's machine line to `machine`; then render `benchmarks` (None: do not).

    A row replaces the stored row with the same first `key_columns` cells, or is appended, so runs that measure
    different rows of one table (another model, another strength) fill it in turn. If `columns` differ from the
    stored header the stored rows are dropped: they were measured for another table. Writes are atomic."""
    paths = [p for p in section_files(results) if SECTION_FILE.match(p.name).group(2) == slug]
    if len(paths) != 1:
        raise ValueError(f"no section file {results}/NNN-{slug}.json: create it first (benchmarks/results/README.md)")
    section = load(paths[0])
    tables = [b["table"] for b in section["blocks"] if "table" in b]
    if table >= len(tables):
        raise ValueError(f"{paths[0].name} has {len(tables)} table(s), no table number {table}")
    stored, new_rows = tables[table], [[str(cell) for cell in row] for row in rows]
    if stored["columns"] != list(columns):
        stored.update(columns=list(columns), rows=[])
        stored.pop("align", None)
    for row in new_rows:
        keys = [r[:key_columns] for r in stored["rows"]]
        if row[:key_columns] in keys:
            stored["rows"][keys.index(row[:key_columns])] = row
        else:
            stored["rows"].append(row)
    blocks = section["blocks"]
    where = next((i for i, b in enumerate(blocks) if "machine" in b), None)
    if where is None:  # the table's machine line lived in its `##` intro: this run gets its own
        where = next(i for i, b in enumerate(blocks) if b.get("table") is stored)
        blocks.insert(where, {"machine": machine})
    else:
        blocks[where] = {"machine": machine}
    write_section(paths[0], section)
    if benchmarks is not None:
        write_atomic(benchmarks, render(results))
    return paths[0]
