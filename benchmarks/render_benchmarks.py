"""Render BENCHMARKS.md from benchmarks/results/ (header.md + the NNN-slug.json section files), or check it.

    python benchmarks/render_benchmarks.py            # write BENCHMARKS.md
    python benchmarks/render_benchmarks.py --check    # exit 1 with a diff if BENCHMARKS.md is not the rendered text

The output depends only on the files' contents (sorted by name), so rendering twice gives the same bytes. Both modes
refuse section files that break the format (benchmarks/results/README.md) and name each problem.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from _results import BENCHMARKS, RESULTS, problems, render, write_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of header.md and section files")
    parser.add_argument("--out", type=Path, default=BENCHMARKS, help="the markdown file written or checked")
    args = parser.parse_args(argv)
    found = problems(args.results)
    if found:
        print("\n".join(found) + f"\n{len(found)} problem(s) in {args.results}: fix them and render again")
        return 1
    text = render(args.results)
    current = args.out.read_text() if args.out.exists() else ""
    if args.check:
        if current == text:
            print(f"{args.out.name} is the rendered output of {args.results}")
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                   f"{args.out.name} (committed)", f"{args.out.name} (rendered)"))
        print(f"\n{args.out.name} differs from its sources: run python benchmarks/render_benchmarks.py")
        return 1
    if current != text:
        write_atomic(args.out, text)
    print(f"wrote {args.out}" if current != text else f"{args.out.name} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
