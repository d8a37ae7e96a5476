"""Checkpoint formats register their loaders (checkpoint.py imports neither quant nor prune), the `needs_calibration`
registry flag, and the quant package face (its `__init__` only hands names on)."""
import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.record import update_record
import vitlab.checkpoint as checkpoint
from vitlab.techniques import (Kind, TechniqueError, needs_calibration, parse_apply, register_technique,
                               unregister_technique)

VITLAB = Path(vitlab.__file__).parent


def _imported_modules(path: Path) -> list[str]:
    """Every module an `import` / `from ... import` anywhere in `path` names (function-local ones included),
    relative imports written as dots + name."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names += [base] + [f"{base}.{a.name}" if node.module else base + a.name for a in node.names]
    return names


def test_checkpoint_imports_neither_quant_nor_prune():
    names = _imported_modules(VITLAB / "checkpoint.py")
    assert names and not [n for n in names if "quant" in n.split(".") or "prune" in n.split(".")], names


def test_quant_init_only_hands_names_on():
    tree = ast.parse((VITLAB / "quant" / "__init__.py").read_text())
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert defs == []
    import vitlab.quant as quant

    assert all(hasattr(quant, name) for name in quant.__all__)
    # importing the package registers its techniques, their handlers and its checkpoint format
    from vitlab.quant.export import load_quantized
    from vitlab.techniques import _HANDLERS

    for text, cls in (("ptq", quant.PTQ), ("w8a8", quant.W8A8), ("w8", quant.W8), ("bf16", quant.BF16)):
        assert type(parse_apply([text])[0]) is cls and cls in _HANDLERS
    assert checkpoint._FORMATS["quantization"] is load_quantized


@pytest.fixture
def fake_format(monkeypatch):
    """A "fake" section whose loader records its call, registered only once checkpoint asks for the builtins."""
    calls = []

    def loader(directory, **kwargs):
        calls.append((Path(directory), kwargs))
        return "loaded by fake"

    def load_builtins():
        calls.append("builtins")
        checkpoint.register_format("fake", loader)

    monkeypatch.setattr(checkpoint, "_FORMATS", dict(checkpoint._FORMATS))
    monkeypatch.setattr(checkpoint, "_load_builtin_techniques", load_builtins)
    return calls


def _with_section(tmp_path, tiny_model, section: str) -> Path:
    folder = vitlab.save_checkpoint(tiny_model, tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config[section] = {"anything": 1}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_section_is_loaded_by_its_registered_loader(tmp_path, tiny_model, fake_format):
    folder = _with_section(tmp_path, tiny_model, "fake")
    assert vitlab.create_model(folder, num_classes=10) == "loaded by fake"
    # not registered yet -> the technique packages are imported first, then the loader runs with the caller's kwargs
    assert fake_format == ["builtins", (folder, {"num_classes": 10})]


def test_an_unknown_section_is_ignored_as_before(tmp_path, tiny_model, fake_format):
    folder = _with_section(tmp_path, tiny_model, "notes")
    model = vitlab.create_model(folder)
    assert isinstance(model, torch.nn.Module) and fake_format == ["builtins"]
    torch.testing.assert_close(model(torch.zeros(1, 1, 16, 16)), tiny_model.eval()(torch.zeros(1, 1, 16, 16)))


def test_quantized_and_resized_folders_load_in_a_fresh_process(tmp_path, tiny_model):
    """A fresh `import vitlab` has neither quant nor prune loaded: create_model finds their loaders through the
    registry (quant: the whole folder; prune: "model.resized" re-shapes the model before its weights load)."""
    from vitlab.prune.graph import resize_
    from vitlab.quant import PTQ, save_quantized

    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    pruned = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    description = {"dropped": ["blocks.1"]}
    resize_(pruned, description)
    update_record(pruned, resized=description)
    vitlab.save_checkpoint(pruned, tmp_path / "pruned")
    quantized = vitlab.apply_(tiny_model.eval(), PTQ(w=4, a=4), calib=[torch.randn(4, 1, 16, 16)])
    save_quantized(quantized, tmp_path / "quant")
    with torch.no_grad():
        want = {"pruned": pruned(x), "quant": quantized(x)}
    torch.save(x, tmp_path / "x.pt")
    code = ("import json, sys, torch, vitlab\n"
            "before = [m for m in sys.modules if m.startswith(('vitlab.quant', 'vitlab.prune'))]\n"
            "x = torch.load(sys.argv[1] + '/x.pt')\nout = {}\n"
            "for name in ('pruned', 'quant'):\n"
            "    with torch.no_grad():\n"
            "        out[name] = vitlab.create_model(sys.argv[1] + '/' + name)(x).tolist()\n"
            "print(json.dumps({'before': before, 'formats': 'vitlab.prune.formats' in sys.modules, **out}))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["before"] == [] and got["formats"]
    for name in ("pruned", "quant"):
        torch.testing.assert_close(torch.tensor(got[name]), want[name], atol=1e-5, rtol=1e-5, msg=name)
    assert not torch.allclose(want["pruned"], tiny_model(x))   # a block really was dropped


@pytest.mark.parametrize("text, expected", [
    ("ptq", True), ("ptq:w=4,a=4", True), ("w8a8", True), ("qhyvit", True),
    ("w8", False), ("bf16", False), ("shiftadd", False),
    ("lpvit", True), ("lpvit:sparsity=0", False),
    ("tome", False), ("evit", False),
])
def test_needs_calibration_reads_the_registry(text, expected):
    assert needs_calibration(parse_apply([text])[0]) is expected


def test_needs_calibration_flag_can_depend_on_the_config():
    @register_technique("fb1_calib", Kind.STRUCTURE, needs_calibration=lambda cfg: cfg.score == "images")
    @dataclasses.dataclass(frozen=True)
    class Scored:
        score: str = "images"

    @register_technique("fb1_plain", Kind.TOKENS)
    @dataclasses.dataclass(frozen=True)
    class Plain:
        r: int = 1

    try:
        assert needs_calibration(Scored()) and not needs_calibration(Scored(score="weights"))
        assert not needs_calibration(Plain())   # the default
        with pytest.raises(TechniqueError, match="not a registered technique"):
            needs_calibration(object())
    finally:
        unregister_technique("fb1_calib")
        unregister_technique("fb1_plain")
