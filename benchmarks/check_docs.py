"""Check that README.md, BENCHMARKS.md and docs/*.md keep their shape (run by tests/test_docs.py).

    python benchmarks/check_docs.py            # prints one line per problem; exit code 1 if there is any

BENCHMARKS.md is rendered from benchmarks/results/ (render_benchmarks.py, whose `--check` tests/test_docs.py runs);
these rules apply to the rendered text. Rules (the "How to add a section" comment at the top of BENCHMARKS.md states
them for writers):
- README.md is at most 9,000 characters: it is the front page, the rest lives in docs/.
- README.md and BENCHMARKS.md carry no diary words ("session", "superseded", "earlier", "now", an issue number,
  ...): they describe the current state; git keeps the history.
- Every BENCHMARKS.md section (`##` or `###`) that holds a markdown table also has, in itself or in the intro of
  its `##` section, a command (a fenced code block, a line starting with "Command" or a line opening with a
  command in backticks) and a machine line
  ("Machine: ...") that names a machine from the "Machines" list at the top and gives a date (YYYY-MM-DD). Each
  machine of that list names its CPU model and its flags in backticks.
- Every relative link in README.md and docs/*.md points at a file that exists.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 9000

# words that narrate history instead of stating results; matched case-insensitively on word boundaries
DIARY_PATTERNS = [
    r"session", r"superseded", r"earlier", r"first wave", r"wave \d+", r"was reported", r"now", r"previously",
    r"we tried", r"issue \d+", r"issue's", r"the lead", r"since then", r"used to", r"not yet",
]
DIARY = re.compile(r"\b(" + "|".join(DIARY_PATTERNS) + r")\b", re.IGNORECASE)
HEADING = re.compile(r"^(#{2,3}) (.+)$")
TABLE_RULE = re.compile(r"^\|\s*:?-{3,}")
MACHINE_LINE = re.compile(r"^(\*\*)?Machine:?(\*\*)?:?\s", re.IGNORECASE)
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
# a line that opens with a command in backticks: `python benchmarks/x.py ...`, `OMP_NUM_THREADS=1 vitlab ...`
COMMAND_START = re.compile(r"^`(\S+=\S+ )*(\.venv/bin/)?(python|vitlab|make|torchrun)\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class Section:
    """One `##` or `###` section of BENCHMARKS.md: its heading, level, first line number and body lines."""

    title: str
    level: int
    line: int
    body: list[str] = field(default_factory=list)
    parent: "Section | None" = None

    def has_table(self) -> bool:
        return any(TABLE_RULE.match(line) for line in self.body)

    def has_command(self) -> bool:
        return any(line.startswith("```") or line.lower().startswith("command") or COMMAND_START.match(line)
                   for line in self.body)

    def machine_lines(self) -> list[str]:
        return [line for line in self.body if MACHINE_LINE.match(line)]


def _strip_code(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, with inline code spans removed: a command's
    flags (`--now`) are not prose."""
    out, fenced = [], False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"`[^`]*`", "", line)))
    return out


def diary_problems(path: Path) -> list[str]:
    """One message per diary word in the prose of `path` (HTML comments included: they are for writers, and the
    rule is the same)."""
    problems = []
    for number, text in _strip_code(path.read_text().splitlines()):
        for match in DIARY.finditer(text):
            problems.append(f"{path.name}:{number}: diary word {match.group(0)!r}: state the result, not its history")
    return problems


def sections(text: str) -> list[Section]:
    """The `##` / `###` sections of a markdown text, outside fenced code blocks."""
    found: list[Section] = []
    current: Section | None = None
    parent: Section | None = None
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else HEADING.match(line)
        if match:
            level = len(match.group(1))
            current = Section(match.group(2), level, number, parent=parent if level == 3 else None)
            if level == 2:
                parent = current
            found.append(current)
        elif current is not None:
            current.body.append(line)
    return found


def machine_names(secs: list[Section]) -> tuple[list[str], list[str]]:
    """The bold names in the "Machines" section, and a problem for each machine line without backticked flags."""
    names, problems = [], []
    for sec in secs:
        if sec.level == 2 and sec.title.strip().lower() == "machines":
            for line in sec.body:
                match = re.match(r"^- \*\*(.+?)\*\*", line)
                if match:
                    names.append(match.group(1))
                    if "`" not in line:
                        problems.append(f"BENCHMARKS.md: machine {match.group(1)!r} lists no CPU flags in backticks")
    if not names:
        problems.append("BENCHMARKS.md: no '## Machines' section listing the machines as '- **name**: CPU, `flags`'")
    return names, problems


def benchmarks_problems(path: Path) -> list[str]:
    """Sections with a table but no command, or no machine line naming a listed machine and a date."""
    secs = sections(path.read_text())
    names, problems = machine_names(secs)
    for sec in secs:
        if not sec.has_table():
            continue
        scope = [sec] if sec.parent is None else [sec, sec.parent]
        where = f"{path.name}:{sec.line} ({sec.title[:60]!r})"
        if not any(s.has_command() for s in scope):
            problems.append(f"{where}: a table without a command (a ``` block or a 'Command: ...' line)")
        machines = [line for s in scope for line in s.machine_lines()]
        if not machines:
            problems.append(f"{where}: a table without a 'Machine: <name>, YYYY-MM-DD ...' line")
        elif not any(DATE.search(m) and any(n in m for n in names) for m in machines):
            problems.append(f"{where}: its machine line names no machine of the Machines list or no date: {machines[0]!r}")
    return problems


def link_problems(root: Path, paths: list[Path]) -> list[str]:
    """Relative links (anchors ignored) in `paths` that point at no existing file; messages name files from `root`."""
    problems = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                    continue
                file = target.split("#", 1)[0]
                if not (path.parent / file).exists():
                    problems.append(f"{path.relative_to(root)}:{number}: link to a missing file: {target}")
    return problems


def check(root: Path = ROOT) -> list[str]:
    """Every problem found in the repository's documentation, one line each (empty: all rules hold)."""
    readme, benchmarks = root / "README.md", root / "BENCHMARKS.md"
    problems = []
    size = len(readme.read_text())
    if size > README_LIMIT:
        problems.append(f"README.md: {size} characters, over the {README_LIMIT} limit: move detail to docs/")
    problems += diary_problems(readme) + diary_problems(benchmarks)
    problems += benchmarks_problems(benchmarks)
    problems += link_problems(root, [readme, *sorted((root / "docs").glob("*.md"))])
    return problems


def main() -> None:
    problems = check()
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)" if problems else "docs: all checks pass")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
