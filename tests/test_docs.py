"""README.md, BENCHMARKS.md and docs/*.md keep their shape: benchmarks/check_docs.py passes on the repository, and
each of its rules catches the case it is written for (tiny documents in a temporary folder). BENCHMARKS.md is the
rendering of benchmarks/results/ (render_benchmarks.py, _results.py): the committed file equals it, every section
file passes the format's checks, and the writer scripts call stores rows as documented."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # the scripts there import each other as top-level modules
import _results  # noqa: E402
import check_docs  # noqa: E402
import import_markdown_section  # noqa: E402
import render_benchmarks  # noqa: E402

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


# --- BENCHMARKS.md generated from benchmarks/results/ ---------------------------------------------------------------

HEADER = "# B\n\nIntro.\n\n" + MACHINES.rstrip("\n") + "\n"


def _section(level: int = 3, title: str = "Speed", machine: str | None = "Box, 2026-12-06, 2 threads.",
             command: str | None = "python benchmarks/speed.py", rows: list | None = None) -> dict:
    blocks = [{"machine": machine}] if machine else []
    blocks += [{"command": command, "lang": "bash"}] if command else []
    blocks += [{"text": ["Two lines", "of prose."]},
               {"table": {"columns": ["model", "img/s"], "align": [None, "right"], "rows": rows or [["a", "1.0"]]}}]
    return {"level": level, "title": title, "blocks": blocks}


def _results_dir(root: Path, *sections: dict) -> Path:
    results = root / "results"
    results.mkdir(parents=True)
    (results / "header.md").write_text(HEADER)
    for number, section in enumerate(sections, 1):
        _results.write_section(results / f"{number * 10:03d}-s{number}.json", section)
    return results


def test_benchmarks_md_is_the_rendering_of_its_results_files():
    assert _results.problems() == []
    assert (ROOT / "BENCHMARKS.md").read_text() == _results.render(), \
        "BENCHMARKS.md differs from benchmarks/results/: run python benchmarks/render_benchmarks.py"


def test_every_results_table_names_its_command_machine_and_date():
    """Checked on the data itself (check_docs checks the rendered text): each table's section, or the `##` section
    above it, has a command and a machine line that names a listed machine and a date."""
    names = list(_results.machine_flags((_results.RESULTS / "header.md").read_text()))
    parent, tables = None, 0
    for path in _results.section_files():
        section = _results.load(path)
        parent = section if section["level"] == 2 else parent
        if not any("table" in b for b in section["blocks"]):
            continue
        tables += 1
        blocks = section["blocks"] + (parent["blocks"] if parent is not section else [])
        machines = [_results.text_of(b["machine"]) for b in blocks if "machine" in b]
        assert any(_results.DATE.search(m) and m.startswith(tuple(names)) for m in machines), path.name
        assert any("command" in b or any(_results.COMMAND_TEXT.match(line) for line in
                                         _results.text_of(b.get("text", "")).split("\n")) for b in blocks), path.name
    assert tables >= 60


def test_rendering_is_the_documented_markdown_and_passes_check_docs(tmp_path):
    results = _results_dir(tmp_path, _section(level=2), _section(title="Detail", machine=None, command=None))
    text = _results.render(results)
    assert text == _results.render(results)
    assert text.startswith(HEADER + "\n## Speed\n\nMachine: Box, 2026-12-06, 2 threads.\n\n```bash\n"
                           "python benchmarks/speed.py\n```\n\nTwo lines\nof prose.\n\n| model | img/s |\n|---|---:|\n"
                           "| a | 1.0 |\n\n### Detail\n")
    assert check_docs.check(_write(tmp_path / "tree", benchmarks=text)) == []


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(blocks=s["blocks"][1:]), "without a 'machine' block"),
    (lambda s: s["blocks"].pop(1), "without a command"),
    (lambda s: s["blocks"].__setitem__(0, {"machine": "Box, 2 threads."}), "give a date"),
    (lambda s: s["blocks"].__setitem__(0, {"machine": "Laptop, 2026-12-06."}), "must open with one of ['Box']"),
    (lambda s: s["blocks"][3]["table"]["rows"].append(["b"]), "another width"),
    (lambda s: s["blocks"].append({"txt": "typo"}), "exactly one of"),
    (lambda s: s.update(level=4), "needs exactly 'level'"),
    (lambda s: s["blocks"][3]["table"].pop("rows"), "a table needs 'columns' and 'rows'"),
])
def test_a_broken_results_file_is_refused_by_name(tmp_path, capsys, change, message):
    section = _section(level=2)
    change(section)
    results = _results_dir(tmp_path, section)
    found = _results.problems(results)
    assert len(found) == 1 and found[0].startswith("010-s1.json: ") and message in found[0], found
    assert render_benchmarks.main(["--results", str(results), "--out", str(tmp_path / "B.md")]) == 1
    assert not (tmp_path / "B.md").exists() and message in capsys.readouterr().out


def test_check_mode_passes_on_the_rendering_and_prints_a_diff_otherwise(tmp_path, capsys):
    results, out = _results_dir(tmp_path, _section(level=2)), tmp_path / "B.md"
    argv = ["--results", str(results), "--out", str(out)]
    assert render_benchmarks.main(argv + ["--check"]) == 1  # no file yet
    assert render_benchmarks.main(argv) == 0 and out.read_text() == _results.render(results)
    assert render_benchmarks.main(argv + ["--check"]) == 0
    out.write_text(out.read_text().replace("| a | 1.0 |", "| a | 9.9 |"))
    capsys.readouterr()
    assert render_benchmarks.main(argv + ["--check"]) == 1
    diff = capsys.readouterr().out
    assert "-| a | 9.9 |\n+| a | 1.0 |\n" in diff and "run python benchmarks/render_benchmarks.py" in diff


def test_save_rows_replaces_rows_by_key_appends_new_ones_and_renders(tmp_path):
    results = _results_dir(tmp_path, _section(level=2, rows=[["a", "1.0"], ["b", "2.0"]]))
    out = tmp_path / "B.md"
    _results.save_rows("s1", ["model", "img/s"], [["b", 3.5], ["c", 4]], machine="Box, 2026-12-07, 1 thread.",
                       results=results, benchmarks=out)
    stored = _results.load(results / "010-s1.json")
    assert stored["blocks"][0] == {"machine": "Box, 2026-12-07, 1 thread."}
    assert stored["blocks"][3]["table"] == {"columns": ["model", "img/s"], "align": [None, "right"],
                                            "rows": [["a", "1.0"], ["b", "3.5"], ["c", "4"]]}
    assert out.read_text() == _results.render(results) and "| c | 4 |" in out.read_text()
    assert sorted(p.name for p in results.iterdir()) == ["010-s1.json", "header.md"]  # no temporary file left
    # another header: the old rows belong to another table
    _results.save_rows("s1", ["model", "ms"], [["a", "7"]], machine="Box, 2026-12-08.", results=results,
                       benchmarks=None)
    assert _results.load(results / "010-s1.json")["blocks"][3]["table"] == {"columns": ["model", "ms"],
                                                                            "rows": [["a", "7"]]}
    with pytest.raises(ValueError, match="no section file .*NNN-missing.json"):
        _results.save_rows("missing", ["model"], [], machine="Box, 2026-12-08.", results=results)


def test_save_rows_gives_a_section_its_own_machine_line_when_it_inherited_one(tmp_path):
    results = _results_dir(tmp_path, _section(level=2), _section(title="Detail", machine=None, command=None))
    _results.save_rows("s2", ["model", "img/s"], [["a", "2"]], machine="Box, 2026-12-07.", results=results,
                       benchmarks=None)
    blocks = _results.load(results / "020-s2.json")["blocks"]
    assert [next(iter(b)) for b in blocks] == ["text", "machine", "table"] and _results.problems(results) == []


def test_section_files_are_stored_one_table_row_per_line(tmp_path):
    results = _results_dir(tmp_path, _section(level=2, rows=[["a", "1.0"], ["b", "2.0"]]))
    text = (results / "010-s1.json").read_text()
    assert '\n          ["a", "1.0"],\n          ["b", "2.0"]\n' in text and json.loads(text) == _section(
        level=2, rows=[["a", "1.0"], ["b", "2.0"]])


@pytest.mark.parametrize("flags, machine", [
    ("avx2", "AVX2 machine"), ("avx2 avx512f avx512_vnni avx512_bf16", "VNNI machine"),
    ("avx2 avx512f avx512_vnni avx_vnni avx512_bf16 amx_tile amx_int8 amx_bf16", "AMX machine")])
def test_machine_line_names_the_listed_machine_of_this_cpu(monkeypatch, flags, machine):
    monkeypatch.setenv("VITLAB_CPU_FLAGS", flags)
    line = _results.machine_line(1, "quiet")
    assert line.startswith(f"{machine}, ") and ", 1 thread, load average " in line and line.endswith("; quiet.")
    assert _results.DATE.search(line)


def test_machine_line_refuses_a_cpu_that_is_not_listed(monkeypatch):
    monkeypatch.setenv("VITLAB_CPU_FLAGS", "sse4_2")
    with pytest.raises(ValueError, match="none of the machines listed"):
        _results.current_machine()


def test_markdown_sections_import_into_files_that_render_them_back(tmp_path):
    """The parser BENCHMARKS.md was migrated with: a section in the form check_docs asks for renders back to the
    same text; an imported section whose slug exists replaces its file, a new one goes after --after."""
    results, out = _results_dir(tmp_path, _section(level=2)), tmp_path / "B.md"
    snippet = ("### Detail ×2\n\nMachine: Box, 2026-12-07, 1 thread.\n`python benchmarks/d.py` then:\n\n```\nmake x\n"
               "```\n\n| a | b \\| c |\n|:---|:---:|\n| 1 | |\n\n- a list\n- of two\n")
    (tmp_path / "new.md").write_text(snippet)
    argv = [str(tmp_path / "new.md"), "--results", str(results), "--out", str(out)]
    with pytest.raises(SystemExit, match="give --after SLUG"):
        import_markdown_section.main(argv)
    assert import_markdown_section.main(argv + ["--after", "s1"]) == 0
    assert _results.load(results / "505-detail-x2.json")["blocks"] == [
        {"machine": "Box, 2026-12-07, 1 thread."}, {"text": "`python benchmarks/d.py` then:"},
        {"command": "make x", "lang": ""},
        {"table": {"columns": ["a", "b \\| c"], "align": ["left", "center"], "rows": [["1", ""]]}},
        {"text": ["- a list", "- of two"]}]
    expected = snippet.replace("1 thread.\n", "1 thread.\n\n")
    assert out.read_text().endswith("\n" + expected) and render_benchmarks.main(
        ["--check", "--results", str(results), "--out", str(out)]) == 0
    (tmp_path / "new.md").write_text(snippet.replace("| 1 |", "| 2 |"))
    assert import_markdown_section.main(argv) == 0
    assert sorted(p.name for p in results.glob("*.json")) == ["010-s1.json", "505-detail-x2.json"]
    assert "| 2 | |" in out.read_text()


def test_the_scripts_that_store_rows_name_existing_sections():
    slugs = {_results.SECTION_FILE.match(p.name).group(2) for p in _results.section_files()}
    for script in ("video_interaction.py", "tokens_topvim.py", "dense_kmax.py"):
        text = (ROOT / "benchmarks" / script).read_text()
        assert "save_rows(SECTION" in text and re.search(r'^SECTION = "(.+)"$', text, re.M).group(1) in slugs, script
