"""`vitlab toy`: the registry of the seeds' toy-scale agents — listing, running, and refusing clearly."""
import json

import pytest

from vitlab import agents
from vitlab.agents import registry
from vitlab.cli import main


@pytest.fixture
def toy_registry(monkeypatch):
    """A private registry with two toys: one that runs, one whose package is missing."""
    monkeypatch.setattr(registry, "_TOYS", {})
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", [])

    @agents.register_toy("echo", "returns its seed and quick flag")
    def _echo(out, seed, quick):
        (out / "artefact.txt").write_text("made")
        return {"seed_seen": float(seed), "quick": str(quick)}

    @agents.register_toy("needs-pkg", "needs a package that is not installed", requires=("no_such_module_xyz",))
    def _needs(out, seed, quick):
        raise AssertionError("must not run without its package")


def test_run_writes_metrics_and_artefacts(toy_registry, tmp_path, capsys):
    assert main(["toy", "echo", "--seed", "3", "--quick", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert result["metrics"] == {"seed_seen": 3.0, "quick": "True"}
    assert result["seed"] == 3 and result["quick"] is True and result["wall_s"] >= 0
    assert (tmp_path / "o" / "artefact.txt").read_text() == "made"
    assert "seed_seen" in capsys.readouterr().out


def test_list_names_missing_packages(toy_registry, capsys):
    assert main(["toy"]) == 0
    out = capsys.readouterr().out
    assert "echo" in out and "needs-pkg" in out and "no_such_module_xyz" in out and ".[agents]" in out


def test_unknown_toy_and_missing_package_are_user_errors(toy_registry, tmp_path, capsys):
    assert main(["toy", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown toy 'nope'" in capsys.readouterr().err
    assert main(["toy", "needs-pkg", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "no_such_module_xyz" in err and "pip install" in err
    assert not (tmp_path / "b" / "metrics.json").exists()


def test_double_registration_is_refused(toy_registry):
    with pytest.raises(ValueError, match="already registered"):
        agents.register_toy("echo", "again")(lambda out, seed, quick: {})
