"""Turn `##` / `###` markdown sections (as a benchmark prints them or a report pastes them) into section files of
benchmarks/results/, then render BENCHMARKS.md. BENCHMARKS.md's sections were migrated with this parser.

    python benchmarks/import_markdown_section.py new.md --after kmax-k-means-vs-softmax-cross-attention
    python benchmarks/import_markdown_section.py changed.md      # sections whose slug exists replace their file

A section's slug comes from its title; one whose slug has a file replaces it in place (same number), the others are
numbered between `--after`'s file and the next one. Paragraphs, ```-fenced blocks and tables become "text",
"command" and "table" blocks; a paragraph opening with "Machine: " becomes the "machine" block (a command line in it
starts a text block). Blank lines are normalised to one between blocks, table cells to one space of padding.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from _results import (BENCHMARKS, COMMAND_TEXT, RESULTS, SECTION_FILE, Section, problems, render, section_files,
                      write_atomic, write_section)

HEADING = re.compile(r"^(#{2,3}) (.+)$")
RULE_CELL = re.compile(r"^:?-{3,}:?$")


def _stored(lines: list[str]) -> str | list[str]:
    return lines[0] if len(lines) == 1 else lines


def _cells(line: str) -> list[str]:
    """The cells of a `| a | b |` row: split on pipes not escaped as `\\|`, stripped."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|"))]


def _table(lines: list[str]) -> dict:
    rows = [_cells(line) for line in lines]
    if len(rows) < 2 or not all(RULE_CELL.match(c) for c in rows[1]):  # no alignment rule: not a table in GFM
        rows.insert(1, ["---"] * len(rows[0]))
    align = [("center" if c[0] == c[-1] == ":" else "left" if c[0] == ":" else "right" if c[-1] == ":" else None)
             for c in rows[1]]
    return {"columns": rows[0], **({"align": align} if any(align) else {}), "rows": rows[2:]}


def _paragraph(lines: list[str]) -> list[dict]:
    if not lines[0].startswith("Machine: "):
        return [{"text": _stored(lines)}]
    lines = [lines[0].removeprefix("Machine: "), *lines[1:]]
    cut = next((k for k in range(1, len(lines)) if COMMAND_TEXT.match(lines[k])), len(lines))
    return [{"machine": _stored(lines[:cut])}] + ([{"text": _stored(lines[cut:])}] if cut < len(lines) else [])


def blocks(body: list[str]) -> list[dict]:
    """The blocks of a section's body lines (the lines after its heading)."""
    found, i = [], 0
    while i < len(body):
        if not body[i]:
            i += 1
        elif body[i].startswith("```"):
            end = next((j for j in range(i + 1, len(body)) if body[j].startswith("```")), len(body))
            found.append({"command": _stored(body[i + 1:end]), "lang": body[i][3:]})
            i = end + 1
        else:
            table = body[i].startswith("|")
            end = next((j for j in range(i, len(body)) if (not body[j].startswith("|") if table else
                        not body[j] or body[j].startswith(("```", "|")))), len(body))
            found += [{"table": _table(body[i:end])}] if table else _paragraph(body[i:end])
            i = end
    return found


def parse(text: str) -> list[Section]:
    """The `##` / `###` sections of a markdown text (headings inside fenced blocks are code, not headings)."""
    sections, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        match = None if fenced else HEADING.match(line)
        if match:
            sections.append({"level": len(match.group(1)), "title": match.group(2), "body": []})
        elif sections:
            sections[-1]["body"].append(line)
    return [{"level": s["level"], "title": s["title"], "blocks": blocks(s["body"])} for s in sections]


def slugify(title: str) -> str:
    """A file-name slug from a heading: lowercase words joined by '-', cut at a word to at most 48 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower().replace("×", "x")).strip("-")
    return slug if len(slug) <= 48 else slug[:48].rsplit("-", 1)[0]


def place(sections: list[Section], after: str | None, results: Path = RESULTS) -> list[Path]:
    """The file each section goes to: its slug's file if there is one, else a number between `after`'s file and
    the next one."""
    numbers = {SECTION_FILE.match(p.name).group(2): int(SECTION_FILE.match(p.name).group(1))
               for p in section_files(results)}
    new = [s for s in sections if slugify(s["title"]) not in numbers]
    if new and numbers and after not in numbers:
        raise SystemExit(f"{len(new)} new section(s) ({new[0]['title']!r}, ...): give --after SLUG, the slug of the "
                         f"section file they follow; got {after!r}")
    low = numbers.get(after, 0)
    high = min([n for n in numbers.values() if n > low], default=1000)
    step = (high - low) // (len(new) + 1)
    if new and step < 1:
        raise SystemExit(f"no free numbers between {low:03d} and {high:03d}: renumber the files around them")
    paths, k = [], 0
    for section in sections:
        slug = slugify(section["title"])
        if slug not in numbers:
            k += 1
            numbers[slug] = low + k * step
        paths.append(results / f"{numbers[slug]:03d}-{slug}.json")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("markdown", type=Path, help="a file holding one or more ## / ### sections")
    parser.add_argument("--after", help="slug of the section file that new sections follow")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=BENCHMARKS, help="the markdown file rendered afterwards")
    args = parser.parse_args(argv)
    sections = parse(args.markdown.read_text())
    if not sections:
        raise SystemExit(f"{args.markdown} holds no '## ' or '### ' heading")
    for section, path in zip(sections, place(sections, args.after, args.results)):
        write_section(path, section)
        print(f"wrote {path}")
    found = problems(args.results)
    if found:
        print("\n".join(found) + "\nfix these section files, then run python benchmarks/render_benchmarks.py")
        return 1
    write_atomic(args.out, render(args.results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
