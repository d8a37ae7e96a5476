"""Bad input, one table: every row runs a verb in process and must exit 2 with exactly one line on stderr that names
the bad value, leaving every input file as it was (hashed before and after). Then the promises around it: --debug,
exit 1 for bugs, valid-but-odd images, atomic-write modes, dtype rules, explain's output format, pareto's hints.

A user's mistake must cost one clear line, not a traceback or a damaged file. Kept fast: vl_test_vit, synthetic
data, no training.
"""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.cli import main

CLASSES = 3


# ------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Pristine inputs, copied into each row's folder: a float checkpoint, and quantized ones (simulated, ONNX
    Runtime, OpenVINO), all vl_test_vit with 3 classes."""
    from vitlab.quant import PTQ, W8A8
    from vitlab.quant.export import save_quantized

    root = tmp_path_factory.mktemp("sources")
    calib = [torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))]
    torch.manual_seed(0)
    vitlab.save_checkpoint(vitlab.create_model("vl_test_vit", num_classes=CLASSES), root / "ck")
    for name, cfg in (("ptq", PTQ(w=8, a=8)), ("ort", W8A8(engine="onnxruntime", threads=1)),
                      ("ov", W8A8(engine="openvino", threads=1))):
        torch.manual_seed(0)
        model = vitlab.create_model("vl_test_vit", num_classes=CLASSES).eval()
        save_quantized(vitlab.load(model, [cfg], calibration=lambda m: calib), root / name)   # model or runner
    return root


@pytest.fixture
def ws(sources, tmp_path):
    """A row's workspace: copies of the sources, a valid image, and an `out` path that may be written."""
    for name in ("ck", "ptq", "ort", "ov"):
        shutil.copytree(sources / name, tmp_path / name)
    Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20)).save(tmp_path / "img.png")
    return tmp_path


def _snapshot(root: Path) -> dict:
    """Every file and link under `root` except the `out*` outputs: content hash (or link target) and mode."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        if rel_folder.parts and rel_folder.parts[0].startswith("out"):
            continue
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            rel = str(rel_folder / name)
            if rel.startswith("out"):
                continue
            if path.is_symlink():
                seen[rel] = ("link", os.readlink(path))
            else:
                seen[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(path.stat().st_mode))
    return seen


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ------------------------------------------------------------------------------------------------ damage helpers

def _config(folder: str, change: Callable[[dict], None]):
    def setup(ws: Path):
        path = ws / folder / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
    return setup


def _write(rel: str, data: bytes):
    def setup(ws: Path):
        path = ws / rel
        path.unlink(missing_ok=True)
        path.write_bytes(data)
    return setup


def _remove(rel: str):
    return lambda ws: (ws / rel).unlink()


def _truncate(rel: str):
    def setup(ws: Path):
        data = (ws / rel).read_bytes()
        (ws / rel).write_bytes(data[: len(data) // 2])
    return setup


def _link_out(rel: str):
    """Replace `rel` by a symlink to an identical copy outside its folder (a checkpoint must not read it)."""
    def setup(ws: Path):
        path = ws / rel
        outside = ws / f"elsewhere-{path.name}"
        shutil.copy(path, outside)
        path.unlink()
        path.symlink_to(outside)
    return setup


def _tensor(folder: str, pick: Callable[[str], bool], dtype: torch.dtype):
    """Store the first tensor whose name `pick`s as `dtype` (same shape) in folder/model.safetensors."""
    def setup(ws: Path):
        path = ws / folder / "model.safetensors"
        state = load_file(str(path))
        key = next(k for k in state if pick(k))
        state[key] = state[key].to(dtype)
        save_file(state, str(path))
    return setup


def _extra_tensor(ws: Path):
    path = ws / "ck" / "model.safetensors"
    state = load_file(str(path))
    state["sneaky.weight"] = torch.zeros(2)
    save_file(state, str(path))


def _both(*setups):
    def setup(ws: Path):
        for step in setups:
            step(ws)
    return setup


def _copy(rel: str, to: str):
    return lambda ws: shutil.copy(ws / rel, ws / to)


def _onnx_external(rel: str, location: str):
    """Move the graph's first initializer to an external data file at `location` (relative to the graph)."""
    def setup(ws: Path):
        import onnx

        model = onnx.load(str(ws / rel))
        tensor = model.graph.initializer[0]
        raw = tensor.raw_data
        (ws / rel).parent.joinpath(location).write_bytes(raw)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        (ws / rel).write_bytes(model.SerializeToString())
    return setup


def _drop_tensors(folder: str, suffix: str):
    def setup(ws: Path):
        path = ws / folder / "model.safetensors"
        save_file({k: v for k, v in load_file(str(path)).items() if not k.endswith(suffix)}, str(path))
    return setup


def _pickle_in_folder(ws: Path):
    state = load_file(str(ws / "ck" / "model.safetensors"))
    (ws / "ck" / "model.safetensors").unlink()
    torch.save(state, ws / "ck" / "model.pt")


def _set(path: str, value):
    """A config change: set a dotted key (a list index may be a number) to `value`, or delete it (value=KeyError)."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def change(config):
        node = config
        for k in keys[:-1]:
            node = node[k]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return change


def _first_quantizer_value(section: str, value):
    def change(config):
        first = next(iter(config["quantization"][section]))
        config["quantization"][section][first] = value
    return change


def _weights(kind: str):
    """A weights file beside the checkpoints, for `vitlab convert`."""
    class Boom:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    def setup(ws: Path):
        state = load_file(str(ws / "ck" / "model.safetensors"))
        if kind == "pickle":
            torch.save(state, ws / "w.pth")
        elif kind == "evil":
            torch.save({"x": Boom()}, ws / "evil.pth")
        elif kind == "empty":
            (ws / "empty.pth").write_bytes(b"")
        elif kind == "list":
            torch.save([1, 2, 3], ws / "list.pth")
        elif kind == "int8":
            state["head.weight"] = state["head.weight"].to(torch.int8)
            save_file(state, str(ws / "w.safetensors"))
        elif kind == "good":
            save_file(state, str(ws / "w.safetensors"))
        elif kind == "npz":
            np.savez(ws / "w.npz", a=np.zeros(2))
    return setup


def _image(name: str, data: bytes | None = None):
    def setup(ws: Path):
        path = os.path.join(os.fsencode(ws), os.fsencode(name))
        with open(path, "wb") as f:
            f.write((ws / "img.png").read_bytes()[:40] if data is None else data)
    return setup


def _folder(name: str):
    return lambda ws: (ws / name).mkdir()


def _file(name: str, text: str = "not a checkpoint"):
    return lambda ws: (ws / name).write_text(text)


# --------------------------------------------------------------------------------------------------------- table

@dataclass
class Row:
    id: str
    argv: list
    needles: tuple                # each must appear in the one stderr line
    setup: Callable | None = None
    forbidden: tuple = ()         # must not appear


PREDICT = ["predict", "{ck}", "{img}"]
CONVERT = ["convert", "vl_test_vit", None, "--out", "{out}", "--model-kwargs", '{"num_classes": 3}']


def _convert(weights: str, *extra) -> list:
    return [weights if a is None else a for a in CONVERT] + list(extra)


def _predict(folder: str) -> list:
    return ["predict", "{%s}" % folder, "{img}"]


ROWS = [
    # ---- item 16: numeric flags, checked by argparse types (vitlab.utils.args) for every verb
    Row("batch-0", ["bench", "vl_test_vit", "--batch", "0"], ("--batch", "'0'", ">= 1")),
    Row("batch-negative", ["bench", "vl_test_vit", "--batch", "-3"], ("--batch", "'-3'")),
    Row("threads-0", ["bench", "vl_test_vit", "--threads", "0"], ("--threads", "'0'")),
    Row("threads-negative", ["eval", "{ck}", "--threads", "-2"], ("--threads", "'-2'")),
    Row("top-0", PREDICT + ["--top", "0"], ("--top", "'0'")),
    Row("img-size-0", ["bench", "vl_test_vit", "--img-size", "0"], ("--img-size", "'0'")),
    Row("confirm-rounds-negative", ["pareto", "vl_test_vit", "--out", "{out}", "--confirm-rounds", "-1"],
        ("--confirm-rounds", "'-1'", ">= 0")),
    Row("calib-images-0", ["quantize", "{ck}", "--apply", "w8a8", "--out", "{out}", "--calib-images", "0"],
        ("--calib-images", "'0'")),
    Row("epochs-negative", ["train", "--model", "vl_test_vit", "--out", "{out}", "--epochs", "-1"],
        ("--epochs", "'-1'", "> 0")),
    Row("lr-negative", ["train", "--model", "vl_test_vit", "--out", "{out}", "--lr", "-1"], ("--lr", "'-1'")),
    Row("workers-negative", ["train", "--model", "vl_test_vit", "--out", "{out}", "--workers", "-1"],
        ("--workers", ">= 0")),
    Row("label-smoothing-1", ["train", "--model", "vl_test_vit", "--out", "{out}", "--label-smoothing", "1"],
        ("--label-smoothing", "[0, 1)")),
    Row("pareto-batch-0", ["pareto", "vl_test_vit", "--out", "{out}", "--batch", "0"], ("--batch", "'0'")),
    Row("eval-batch-size-0", ["eval", "{ck}", "--batch-size", "0"], ("--batch-size", "'0'")),
    Row("limit-0", ["eval", "{ck}", "--limit", "0"], ("--limit", "'0'")),
    Row("limit-not-a-number", ["measure", "vl_test_vit", "--limit", "ten"], ("--limit", "'ten'")),
    Row("min-time-0", ["bench", "vl_test_vit", "--min-time", "0"], ("--min-time", "> 0")),
    Row("min-time-nan", ["bench", "vl_test_vit", "--min-time", "nan"], ("--min-time", "'nan'")),
    Row("target-flops-above-1", ["prune", "{ck}", "--out", "{out}", "--target-flops", "1.5"],
        ("--target-flops", "(0, 1]", "'1.5'")),
    Row("target-flops-0", ["prune", "{ck}", "--out", "{out}", "--target-flops", "0"], ("--target-flops",)),
    Row("unknown-flag", ["eval", "{ck}", "--bogus"], ("--bogus",)),
    Row("bad-choice", ["eval", "{ck}", "--split", "nope"], ("--split", "'nope'")),
    Row("missing-argument", ["bench"], ("model",)),

    # ---- item 14: config.json content
    Row("config-missing", PREDICT, ("has no config.json",), _remove("ck/config.json")),
    Row("config-empty", PREDICT, ("config.json is not valid JSON",), _write("ck/config.json", b"")),
    Row("config-not-utf8", PREDICT, ("config.json is not valid JSON",), _write("ck/config.json", b"\xff\xfe{\x00")),
    Row("config-a-list", PREDICT, ("config.json", "a JSON object"), _write("ck/config.json", b"[1, 2]")),
    Row("config-no-model", PREDICT, ('"model"', "missing"), _config("ck", _set("model", KeyError))),
    Row("model-name-unknown", PREDICT, ('"model.name"', "'vl_nope'"), _config("ck", _set("model.name", "vl_nope"))),
    Row("model-name-not-text", PREDICT, ('"model.name"', "7"), _config("ck", _set("model.name", 7))),
    Row("model-kwargs-a-list", PREDICT, ('"model.kwargs"',), _config("ck", _set("model.kwargs", []))),
    Row("model-kwargs-missing", PREDICT, ('"model.kwargs"', "missing"),
        _config("ck", _set("model.kwargs", KeyError))),
    Row("model-kwargs-unknown-key", PREDICT, ('"model.kwargs"', "bogus"),
        _config("ck", _set("model.kwargs.bogus", 1))),
    Row("model-kwargs-wrong-type", PREDICT, ('"model.kwargs"', "four"),
        _config("ck", _set("model.kwargs.depth", "four"))),
    Row("format-foreign", PREDICT, ("format 'keras'",), _config("ck", _set("format", "keras"))),
    Row("version-newer", PREDICT, ("version 99", "upgrade vitlab"), _config("ck", _set("version", 99))),
    Row("version-text", PREDICT, ("version '1'",), _config("ck", _set("version", "1"))),
    Row("techniques-not-a-list", PREDICT, ('"techniques"',), _config("ck", _set("techniques", {}))),
    Row("techniques-unknown", PREDICT, ('"techniques"[0]', "nope"),
        _config("ck", _set("techniques", [{"name": "nope"}]))),
    Row("input-size-zero", PREDICT, ('"preprocessing.input_size"',),
        _config("ck", _set("preprocessing.input_size", [1, 0, 16]))),
    Row("mean-wrong-length", PREDICT, ('"preprocessing.mean"', "1 numbers"),
        _config("ck", _set("preprocessing.mean", [0.5, 0.5]))),
    Row("std-zero", PREDICT, ('"preprocessing.std"',), _config("ck", _set("preprocessing.std", [0]))),
    Row("class-names-not-text", PREDICT, ('"preprocessing.class_names"',),
        _config("ck", _set("preprocessing.class_names", [1, 2, 3]))),
    Row("checkpoint-missing", ["predict", "{ws}/nothing-here", "{img}"], ("does not exist",)),
    Row("checkpoint-is-a-file", ["predict", "{ws}/notes.txt", "{img}"], ("is a file, not a checkpoint folder",),
        _file("notes.txt")),

    # ---- items 12, 14, 18: weights
    Row("weights-missing", PREDICT, ("model.safetensors does not exist",), _remove("ck/model.safetensors")),
    Row("weights-empty", PREDICT, ("model.safetensors",), _write("ck/model.safetensors", b"")),
    Row("weights-truncated", PREDICT, ("model.safetensors", "truncated"), _truncate("ck/model.safetensors")),
    Row("weights-int8", PREDICT, ("'head.weight'", "int8", "float32"),
        _tensor("ck", lambda k: k == "head.weight", torch.int8)),
    Row("weights-float64-narrowing", PREDICT, ("'head.weight'", "float64"),
        _tensor("ck", lambda k: k == "head.weight", torch.float64)),
    Row("weights-unexpected-tensor", PREDICT, ("'sneaky.weight'",), _extra_tensor),
    Row("weights-pickle-in-folder", PREDICT, ("model.safetensors does not exist", "model.pt",
                                              "vitlab convert vl_test_vit", "--allow-pickle --out DIR"),
        _pickle_in_folder, ("weights_only=False",)),

    # ---- item 10: paths confined to the checkpoint folder
    Row("weights-symlink-out", PREDICT, ("outside",), _link_out("ck/model.safetensors")),
    Row("config-symlink-out", PREDICT, ("outside",), _link_out("ck/config.json")),
    Row("ir-dotdot", _predict("ort"), ("outside", "'../elsewhere.onnx'", "'..'"),
        _both(_copy("ort/model.onnx", "elsewhere.onnx"), _config("ort", _set("quantization.ir", "../elsewhere.onnx")))),
    Row("ir-dotdot-back-inside", _predict("ort"), ("outside", "'..'"),     # even one that comes back in
        _config("ort", _set("quantization.ir", "../ort/model.onnx"))),
    Row("ir-absolute", _predict("ort"), ("outside", "'/etc/passwd' in", "absolute path"),
        _config("ort", _set("quantization.ir", "/etc/passwd"))),
    Row("ir-symlink-out", _predict("ort"), ("outside",), _link_out("ort/model.onnx")),
    Row("onnx-external-data", _predict("ort"), ("outside", "external file", "'../secret.bin'"),
        _onnx_external("ort/model.onnx", "../secret.bin")),
    Row("ir-not-text", _predict("ort"), ('"quantization.ir"',), _config("ort", _set("quantization.ir", 5))),
    Row("openvino-bin-symlink-out", _predict("ov"), ("outside",), _link_out("ov/model.bin")),

    # ---- item 14: damaged quantized checkpoints
    Row("onnx-missing", _predict("ort"), ("model.onnx", "missing"), _remove("ort/model.onnx")),
    Row("onnx-garbled", _predict("ort"), ("model.onnx", "damaged"), _write("ort/model.onnx", b"\x08\x07garbage" * 9)),
    Row("onnx-empty", _predict("ort"), ("model.onnx",), _write("ort/model.onnx", b"")),
    Row("openvino-xml-missing", _predict("ov"), ("model.xml", "missing"), _remove("ov/model.xml")),
    Row("openvino-xml-garbled", _predict("ov"), ("model.xml", "damaged"), _write("ov/model.xml", b"<net><oops")),
    Row("openvino-bin-missing", _predict("ov"), ("model.bin", "missing"), _remove("ov/model.bin")),
    Row("scales-int8", _predict("ptq"), ("scale", "int8"), _tensor("ptq", lambda k: k.endswith(".scale"), torch.int8)),
    Row("scales-missing", _predict("ptq"), ("scale'", "missing"), _drop_tensors("ptq", ".scale")),
    Row("bits-not-a-number", _predict("ptq"), ('"quantization.bits"',),
        _config("ptq", _first_quantizer_value("bits", "eight"))),
    Row("modes-unknown", _predict("ptq"), ('"quantization.modes"', "fast"),
        _config("ptq", _first_quantizer_value("modes", "fast"))),
    Row("quant-kind-unknown", _predict("ptq"), ('"quantization.kind"', "gpu"),
        _config("ptq", _set("quantization.kind", "gpu"))),
    Row("quant-techniques-dropped", _predict("ptq"), ("quantization",), _config("ptq", _set("techniques", []))),

    # ---- item 18 and --model-kwargs: vitlab convert
    Row("pickle-refused", _convert("{ws}/w.pth"),
        ("w.pth is a pickle file", "does not unpickle", "vitlab convert vl_test_vit", "--allow-pickle --out DIR"),
        _weights("pickle"), ("weights_only=False",)),
    Row("pickle-with-code", _convert("{ws}/evil.pth", "--allow-pickle"), ("evil.pth", "weights_only=True", "print"),
        _weights("evil"), ("weights_only=False", "pickle code ran")),
    Row("pickle-empty", _convert("{ws}/empty.pth", "--allow-pickle"), ("empty.pth", "empty or truncated"),
        _weights("empty"), ("weights_only=False",)),
    Row("pickle-not-a-state-dict", _convert("{ws}/list.pth", "--allow-pickle"), ("list.pth", "no state_dict"),
        _weights("list")),
    Row("convert-int8-weights", _convert("{ws}/w.safetensors"), ("'head.weight'", "int8"), _weights("int8")),
    Row("convert-unknown-format", _convert("{ws}/w.npz"), ("unknown weights format '.npz'",), _weights("npz")),
    Row("convert-missing-weights", _convert("{ws}/none.safetensors"), ("none.safetensors does not exist",)),
    Row("convert-unknown-model", ["convert", "vl_nope", "{ws}/w.safetensors", "--out", "{out}"],
        ("unknown model 'vl_nope'",), _weights("good")),
    Row("model-kwargs-not-json", ["convert", "vl_test_vit", "{ws}/w.safetensors", "--out", "{out}",
                                  "--model-kwargs", "{bad"], ("--model-kwargs", "not JSON"), _weights("good")),
    Row("model-kwargs-a-list", ["convert", "vl_test_vit", "{ws}/w.safetensors", "--out", "{out}",
                                "--model-kwargs", "[3]"], ("--model-kwargs", "JSON object"), _weights("good")),
    Row("model-kwargs-unknown", ["convert", "vl_test_vit", "{ws}/w.safetensors", "--out", "{out}",
                                 "--model-kwargs", '{"bogus": 1}'], ("vl_test_vit", "bogus"), _weights("good")),
    Row("train-model-kwargs-unknown", ["train", "--model", "vl_test_vit", "--data", "synthetic:n=8,classes=2",
                                       "--out", "{out}", "--model-kwargs", '{"bogus": 1}', "--no-progress"],
        ("bogus",)),

    # ---- --out equal to (or inside) what the verb reads
    Row("convert-out-is-weights-folder", ["convert", "vl_test_vit", "{ws}/w.safetensors", "--out", "{ws}",
                                          "--model-kwargs", '{"num_classes": 3}'], ("does not write into its input",),
        _weights("good")),
    Row("prune-out-is-checkpoint", ["prune", "{ck}", "--importance", "l1", "--out", "{ck}"],
        ("--out", "does not write into its input")),
    Row("prune-out-inside-checkpoint", ["prune", "{ck}", "--importance", "l1", "--out", "{ck}/pruned"],
        ("does not write into its input",)),
    Row("quantize-out-is-checkpoint", ["quantize", "{ck}", "--apply", "ptq:w=8,a=8", "--data", "synthetic",
                                       "--out", "{ck}"], ("does not write into its input",)),
    Row("export-out-is-checkpoint", ["export", "{ck}", "--format", "onnx", "--out", "{ck}"],
        ("does not write into its input",)),
    Row("pareto-out-is-checkpoint", ["pareto", "{ck}", "--out", "{ck}"], ("does not write into its input",)),

    # ---- item 19: misleading messages
    Row("quantize-test-split", ["quantize", "{ck}", "--apply", "ptq:w=8,a=8", "--data", "synthetic:n=16,classes=3",
                                "--split", "test", "--out", "{out}"], ("--split test", "--split train"),
        None, ("--calib-split",)),
    Row("predict-a-folder", ["predict", "{ck}", "{ws}/photos"], ("is a folder", "image files"), _folder("photos"),
        ("does not exist",)),
    Row("predict-missing-image", ["predict", "{ck}", "{ws}/nope.png"], ("nope.png does not exist",)),
    Row("predict-zero-byte-image", ["predict", "{ck}", "{ws}/zero.png"], ("zero.png", "empty"),
        _image("zero.png", b"")),
    Row("predict-truncated-image", ["predict", "{ck}", "{ws}/cut.png"], ("cut.png",), _image("cut.png")),
    Row("predict-text-as-image", ["predict", "{ck}", "{ws}/notes.png"], ("notes.png", "cannot read image"),
        _image("notes.png", b"hello, I am text")),
    Row("predict-non-utf8-name", ["predict", "{ck}", os.fsdecode(b"{ws}/caf\xe9.png")], ("caf\\xe9.png",),
        _image(os.fsdecode(b"caf\xe9.png"), b"not an image")),
    Row("explain-unknown-suffix", ["explain", "vl_test_vit", "--image", "{img}", "--tokens", "--apply", "tome:r=2",
                                   "--out", "{ws}/out.bmp"], (".bmp", ".png")),
    Row("explain-no-suffix", ["explain", "vl_test_vit", "--image", "{img}", "--tokens", "--apply", "tome:r=2",
                              "--out", "{ws}/out"], ("--out", "(none)")),
    Row("explain-out-is-a-folder", ["explain", "vl_test_vit", "--image", "{img}", "--tokens", "--apply", "tome:r=2",
                                    "--out", "{ws}/pictures.png"], ("is a folder",), _folder("pictures.png")),
    Row("apply-unknown-technique", ["bench", "vl_test_vit", "--apply", "nope:r=1"], ("unknown technique 'nope'",)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(row, ws, capsys):
    if row.setup is not None:
        row.setup(ws)
    places = {"ws": str(ws), "img": str(ws / "img.png"), "out": str(ws / "out"),
              **{k: str(ws / k) for k in ("ck", "ptq", "ort", "ov")}}
    argv = [a.replace("{", "<<").replace("}", ">>") if a.startswith("{\"") or a.startswith("{b") else a
            for a in row.argv]  # JSON and "{bad" are values, not placeholders
    argv = [a.format(**places).replace("<<", "{").replace(">>", "}") for a in argv]
    before = _snapshot(ws)
    code, out, err = _run(argv, capsys)
    lines = err.splitlines()
    verb = next(a for a in argv if not a.startswith("-"))
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert len(lines) == 1, f"{len(lines)} stderr lines:\n{err}"
    assert lines[0].startswith(f"vitlab {verb}: error: "), lines[0]
    for needle in row.needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    for word in row.forbidden + ("Traceback",):
        assert word not in err, f"{word!r} in: {err}"
    assert _snapshot(ws) == before, "an input file changed"
    assert not (ws / "out").exists() or not any(p.is_file() for p in (ws / "out").rglob("*")), "output written"


def test_every_numeric_flag_of_every_verb_is_validated():
    """One validation layer: no verb takes a bare int/float flag (each has a vitlab.utils.args type)."""
    import argparse

    from vitlab.cli import _parser

    parser = _parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    bare = [f"{verb} {a.option_strings[0]}" for verb, sub in verbs.items() for a in sub._actions
            if a.type in (int, float) and a.option_strings]
    assert not bare, bare


# ------------------------------------------------------------------------------------- odd but valid images

def _odd_images(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (24, 18, 3), dtype=np.uint8)
    names = []

    def save(name, image, **kw):
        image.save(folder / name, **kw)
        names.append(str(folder / name))

    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    save("sixteen.png", Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)))
    save("alpha.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
    save("gray-alpha.png", Image.fromarray(rgb[..., 0]).convert("LA"))
    save("palette.png", Image.fromarray(rgb).convert("P"), transparency=0)
    save("one-pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    save("thin.png", Image.new("L", (300, 1), 128))
    odd = os.fsdecode(os.path.join(os.fsencode(folder), b"r\xe9sum\xe9.png"))
    Image.fromarray(rgb).save(odd, format="PNG")
    names.append(odd)
    return names


def test_odd_but_valid_images_predict(sources, tmp_path, capsys):
    images = _odd_images(tmp_path)
    before = _snapshot(tmp_path)
    code, out, err = _run(["predict", sources / "ck", *images, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result) == len(images) and all(len(top) == CLASSES for top in result.values())
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- the CLI boundary

def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch):
    for argv in (["--debug", "eval", tmp_path / "none"], ["eval", tmp_path / "none", "--debug"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "Traceback" in err and "CheckpointError" in err
        assert err.splitlines()[-1].startswith("vitlab eval: error: checkpoint folder")
    monkeypatch.setenv("VITLAB_DEBUG", "1")
    code, _, err = _run(["eval", tmp_path / "none"], capsys)
    assert code == 2 and "Traceback" in err


def test_a_bug_is_a_traceback_and_exit_1_and_a_user_error_is_one_line(monkeypatch, capsys):
    import vitlab.cli as cli
    from vitlab.errors import UserError, is_user_error

    def bug(args):
        return torch.zeros(2) + torch.zeros(3)

    def numpy_value_error(args):
        return np.zeros(2).reshape(3)   # a ValueError raised inside numpy: a bug, not the user's

    def multi_line(args):
        raise UserError("first line\n  second line\n")

    monkeypatch.setitem(cli.COMMANDS, "models", bug)
    code, _, err = _run(["models"], capsys)
    assert code == 1 and "Traceback" in err and "internal error" in err.splitlines()[-1]
    monkeypatch.setitem(cli.COMMANDS, "models", numpy_value_error)
    code, _, err = _run(["models"], capsys)
    assert code == 1 and "Traceback" in err
    monkeypatch.setitem(cli.COMMANDS, "models", multi_line)
    code, _, err = _run(["models"], capsys)
    assert code == 2 and err == "vitlab models: error: first line; second line\n"
    assert is_user_error(FileNotFoundError("x")) and not is_user_error(RuntimeError("x"))


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    vitlab_bin = Path(sys.executable).parent / "vitlab"
    out = subprocess.run([str(vitlab_bin), "eval", str(tmp_path / "none")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"vitlab eval: error: checkpoint folder {tmp_path / 'none'} does not exist"], out.stderr


# ------------------------------------------------------------------------------------- files, dtypes, outputs

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask):
    from vitlab.utils.io import atomic_path, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        vitlab.save_checkpoint(vitlab.create_model("vl_test_vit"), tmp_path / "ck")
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert want == 0o666 & ~umask
    for path in (tmp_path / "a.txt", tmp_path / "ck" / "config.json", tmp_path / "ck" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    os.chmod(tmp_path / "a.txt", 0o640)                     # an existing file keeps its mode, as with open()
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("y")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640 and (tmp_path / "a.txt").read_text() == "y"


def test_float16_weights_widen_but_nothing_else_is_cast(tmp_path):
    from vitlab.checkpoint import CheckpointError, load_weights

    model = vitlab.create_model("vl_test_vit")
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "half.safetensors"))
    fresh = load_weights(vitlab.create_model("vl_test_vit"), tmp_path / "half.safetensors")
    assert fresh.head.weight.dtype == torch.float32
    torch.testing.assert_close(fresh.head.weight, model.head.weight.half().float())
    state["head.bias"] = state["head.bias"].to(torch.int32)
    save_file(state, str(tmp_path / "int.safetensors"))
    with pytest.raises(CheckpointError, match="'head.bias' is int32 but the model's is float32"):
        load_weights(vitlab.create_model("vl_test_vit"), tmp_path / "int.safetensors")


def test_a_checkpoint_folder_reached_through_a_symlink_loads(sources, tmp_path):
    (tmp_path / "latest").symlink_to(sources / "ck")
    assert vitlab.create_model(tmp_path / "latest").num_classes == CLASSES


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".jpg", b"\xff\xd8\xff"), (".pdf", b"%PDF")])
def test_explain_writes_the_format_the_suffix_names(tmp_path, capsys, suffix, magic):
    Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20)).save(tmp_path / "img.png")
    out = tmp_path / f"tokens{suffix}"
    code, _, err = _run(["explain", "vl_test_vit", "--image", tmp_path / "img.png", "--tokens", "--apply", "tome:r=2",
                         "--out", out], capsys)
    assert code == 0, err
    assert out.read_bytes()[: len(magic)] == magic


def test_explain_draws_gray_images_without_auto_contrast(tmp_path):
    from vitlab.explain import plot_token_sources

    picture = 0.45 + 0.1 * torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))  # gray in [0.45, 0.55]
    plot_token_sources(picture, torch.arange(16).view(4, 4), tmp_path / "t.png")
    drawn = np.asarray(Image.open(tmp_path / "t.png").convert("L"), dtype=np.float32)
    h, w = drawn.shape
    panel = drawn[h // 3: 2 * h // 3, w // 6: w // 3]    # inside the left ("input") panel
    # auto-contrast would stretch [0.45, 0.55] to black..white; drawn as it is, it stays mid-gray
    assert 0.4 * 255 <= panel.min() and panel.max() <= 0.6 * 255, (panel.min(), panel.max())


def test_a_new_recommendation_leaves_no_file_of_the_old_one(tmp_path):
    from vitlab.pareto.export import export_point

    out = tmp_path / "recommended"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier recommendation's graph")
    (out / "model.xml").write_text("<net/>")
    assert export_point(None, {"apply": [], "source": "vl_test_vit"}, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["recommended"]     # no temporary folder left behind
    vitlab.create_model(out)


def test_a_pareto_resume_with_failed_rows_names_restart(tmp_path, monkeypatch):
    import importlib

    from vitlab.pareto import SweepConfig, run_sweep

    measure = importlib.import_module("vitlab.bench.measure")
    real = measure.measure

    def flaky(source, apply=(), **kw):
        if apply:
            raise RuntimeError("this point fails")
        return real(source, apply=apply, **kw)

    cfg = SweepConfig(source="vl_test_vit", out=str(tmp_path / "sweep"), data="synthetic:n=32,classes=10",
                      techniques=["tome:r=1"], min_time_s=0.01, memory=False, threads=1, confirm_rounds=0,
                      export=False)
    monkeypatch.setattr(measure, "measure", flaky)
    run_sweep(cfg, progress=False, log=lambda *_: None, _stop_after=2)
    messages = []
    run_sweep(cfg, progress=False, log=messages.append, _stop_after=0)
    resumed = next(m for m in messages if m.startswith("resuming"))
    assert "1 of them failed (vl_test_vit | tome:r=1)" in resumed and "--restart" in resumed
