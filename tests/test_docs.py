"""README.md, BENCHMARKS.md and docs/*.md keep their shape: benchmarks/check_docs.py passes on the repository, and
each of its rules catches the case it is written for (tiny documents in a temporary folder)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_docs", ROOT / "benchmarks" / "check_docs.py")
check_docs = importlib.util.module_from_spec(_spec)
sys.modules["check_docs"] = check_docs  # dataclasses look their module up while the class is built
_spec.loader.exec_module(check_docs)

MACHINES = "## Machines\n\n- **Box**: Some CPU, 2 cores, flags `avx2`.\n\n"
SECTION = """## Speed

Machine: Box, 2026-12-06, 2 threads.

```bash
python benchmarks/speed.py
```

| model | img/s |
|---|---|
| a | 1.0 |
"""


def _write(root: Path, readme: str = "# x\n", benchmarks: str = "# B\n\n" + MACHINES + SECTION,
           docs: dict[str, str] | None = None) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text(readme)
    (root / "BENCHMARKS.md").write_text(benchmarks)
    for name, text in (docs or {"a.md": "# a\n"}).items():
        (root / "docs" / name).write_text(text)
    return root


def test_the_repository_passes_the_check():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_docs.py")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


def test_a_well_formed_tree_passes(tmp_path):
    assert check_docs.check(_write(tmp_path)) == []


def test_readme_over_the_limit_fails(tmp_path):
    problems = check_docs.check(_write(tmp_path, readme="x" * 9001))
    assert len(problems) == 1 and "9001 characters" in problems[0]
    assert check_docs.check(_write(tmp_path / "ok", readme="x" * 9000)) == []


@pytest.mark.parametrize("prose", ["This is now faster.", "Superseded by the table below.", "See issue 17.",
                                   "An earlier run gave 2x.", "The first wave of models."])
def test_a_diary_word_in_prose_fails(tmp_path, prose):
    problems = check_docs.check(_write(tmp_path, readme=f"# x\n\n{prose}\n"))
    assert len(problems) == 1 and "README.md:3: diary word" in problems[0]


def test_diary_words_inside_code_are_not_prose(tmp_path):
    readme = "# x\n\nRun `vitlab train --now`.\n\n```bash\necho earlier session\n```\n"
    assert check_docs.check(_write(tmp_path, readme=readme)) == []
    assert check_docs.check(_write(tmp_path / "k", readme="Known limits, snowfall, nowhere.\n")) == []


def test_a_table_without_a_command_or_a_machine_line_fails(tmp_path):
    no_command = SECTION.replace("```bash\npython benchmarks/speed.py\n```\n", "")
    problems = check_docs.check(_write(tmp_path / "c", benchmarks="# B\n\n" + MACHINES + no_command))
    assert len(problems) == 1 and "without a command" in problems[0]
    no_machine = SECTION.replace("Machine: Box, 2026-12-06, 2 threads.\n", "")
    problems = check_docs.check(_write(tmp_path / "m", benchmarks="# B\n\n" + MACHINES + no_machine))
    assert len(problems) == 1 and "without a 'Machine:" in problems[0]
    unknown = SECTION.replace("Machine: Box,", "Machine: Laptop,")
    problems = check_docs.check(_write(tmp_path / "u", benchmarks="# B\n\n" + MACHINES + unknown))
    assert len(problems) == 1 and "names no machine" in problems[0]
    undated = SECTION.replace("2026-12-06, ", "")
    assert len(check_docs.check(_write(tmp_path / "d", benchmarks="# B\n\n" + MACHINES + undated))) == 1


def test_a_subsection_inherits_command_and_machine_from_its_section_intro(tmp_path):
    nested = SECTION.replace("\n| model", "\n### Detail\n\n| model")
    assert check_docs.check(_write(tmp_path / "n", benchmarks="# B\n\n" + MACHINES + nested)) == []
    # but not from a sibling section
    sibling = SECTION + "\n## Other\n\n| model | img/s |\n|---|---|\n| b | 2.0 |\n"
    assert len(check_docs.check(_write(tmp_path / "s", benchmarks="# B\n\n" + MACHINES + sibling))) == 2


def test_a_machine_without_flags_fails(tmp_path):
    bare = MACHINES.replace(", flags `avx2`", "")
    problems = check_docs.check(_write(tmp_path, benchmarks="# B\n\n" + bare + SECTION))
    assert problems == ["BENCHMARKS.md: machine 'Box' lists no CPU flags in backticks"]


def test_a_broken_relative_link_fails(tmp_path):
    docs = {"a.md": "[b](b.md#part) [web](https://example.com) [here](#x) [up](../README.md)\n", "b.md": "# b\n"}
    assert check_docs.check(_write(tmp_path / "ok", docs=docs)) == []
    problems = check_docs.check(_write(tmp_path / "bad", readme="[gone](docs/gone.md)\n"))
    assert problems == ["README.md:1: link to a missing file: docs/gone.md"]
