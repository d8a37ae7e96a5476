"""One preprocessing for every verb, so a model sees the same pixels whichever verb feeds it: vitlab.data.transforms,
and eval / predict through it.

The reference checkpoint (checkpoints/fashion-mnist-reference, 1x28x28) reads PNG files written from the
Fashion-MNIST val split, some resized or made non-square: `predict`'s top-1 of each file equals `eval`'s top-1 of
the same file in an image folder, and a native 28x28 PNG gets the top-1 its idx tensor gets.
"""
import io
import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.record import update_record
from vitlab.cli import main
from vitlab.data import DataError, build_dataset
from vitlab.data.transforms import (Preprocessing, check_classes, dataset_for_model, image_transform,
                                    load_image_tensor, resolve_preprocessing)
from vitlab.engine.evaluate import evaluate

REFERENCE = Path(__file__).resolve().parents[2] / "checkpoints" / "fashion-mnist-reference"
N_PER_CLASS = 3


def _folder_safe(name: str) -> str:
    return name.replace("/", "-")  # "T-shirt/top" cannot be a folder name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference checkpoint with folder-safe class names."""
    folder = tmp_path_factory.mktemp("ref") / "ck"
    folder.mkdir()
    shutil.copyfile(REFERENCE / "model.safetensors", folder / "model.safetensors")
    config = json.loads((REFERENCE / "config.json").read_text())
    config["preprocessing"]["class_names"] = [_folder_safe(n) for n in config["preprocessing"]["class_names"]]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def val_pngs(tmp_path_factory):
    """imagefolder ROOT/CLASS/*.png: N_PER_CLASS val images per class at 28x28, each also resized (56x56), made
    non-square (28x40 and 36x20, stretched) and RGB; returns (root, {file: val index})."""
    root = tmp_path_factory.mktemp("pngs")
    val = build_dataset("fashion-mnist", "val")
    per_class, index_of = {}, {}
    for i, label in enumerate(val.targets.tolist()):
        if per_class.get(label, 0) == N_PER_CLASS:
            continue
        per_class[label] = per_class.get(label, 0) + 1
        folder = root / _folder_safe(val.classes[label])
        folder.mkdir(exist_ok=True)
        im = Image.fromarray(val.images[val.indices[i], 0].numpy())
        versions = {"": im, "_56": im.resize((56, 56), Image.BICUBIC), "_wide": im.resize((40, 28), Image.BILINEAR),
                    "_tall": im.resize((20, 36), Image.BILINEAR), "_rgb": im.convert("RGB")}
        for suffix, version in versions.items():
            path = folder / f"val{i}{suffix}.png"
            version.save(path)
            index_of[str(path)] = i
    return root, index_of


def test_predict_equals_eval_per_image(reference, val_pngs, capsys):
    root, index_of = val_pngs
    names = vitlab.load_config(reference)["preprocessing"]["class_names"]
    model = vitlab.create_model(reference)
    with pytest.warns(UserWarning, match="matched by name"):  # sorted folders != the checkpoint's class order
        data = dataset_for_model(model, f"imagefolder:{root}", "test")
    assert data.classes == names and len(data) == len(index_of) == 10 * N_PER_CLASS * 5
    result = evaluate(model, data, batch_size=32, progress=False, predictions=True)
    assert result["n"] == len(data) and result["skipped"] == 0
    eval_top1 = {data.samples[i][0]: top for i, top in result["predictions"].items()}

    files = sorted(index_of)
    assert main(["predict", str(reference), *files, "--top", "1", "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    predict_top1 = {path: names.index(top[0]["class"]) for path, top in predicted.items()}
    assert predict_top1 == eval_top1

    # a native 28x28 PNG is the idx image: same top-1 as the Fashion-MNIST tensors (mapped by name, not by order)
    val = build_dataset("fashion-mnist", "val")
    native = [p for p in files if "_" not in Path(p).stem]
    idx = torch.stack([val[index_of[p]][0] for p in native])
    with torch.inference_mode():
        assert model(idx).argmax(1).tolist() == [eval_top1[p] for p in native]
    assert [data.samples[i][1] for i in range(len(data))] == \
        [val.targets[index_of[p]].item() for p, _ in data.samples]

    # the CLI's eval reads the folder the same way: its top-1 is predict's accuracy
    with pytest.warns(UserWarning, match="matched by name"):
        assert main(["eval", str(reference), "--data", f"imagefolder:{root}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hits = [predict_top1[p] == val.targets[index_of[p]].item() for p in files]
    assert summary["n"] == len(files) and summary["skipped"] == 0 and summary["top1"] == pytest.approx(np.mean(hits))
    assert np.mean([h for h, p in zip(hits, files) if p in native]) >= 0.8  # the reference's ~90 %, not a remap


def test_resolve_preprocessing_sources(reference):
    pre = resolve_preprocessing(vitlab.create_model(reference))
    assert pre.input_size == (1, 28, 28) and pre.mean == (0.286,) and pre.std == (0.353,)
    assert (pre.interpolation, pre.crop_pct, pre.crop_mode) == ("bilinear", 1.0, "center")
    assert pre.num_classes == 10 and pre.class_names[0] == "T-shirt-top" and "ck" in pre.source
    # a model by name: timm's pretrained_cfg (CvT: bicubic, crop 0.875, ImageNet stats); placeholders -> no names
    cvt = resolve_preprocessing(vitlab.create_model("vl_test_cvt"))
    assert cvt.input_size == (3, 32, 32) and cvt.interpolation == "bicubic" and cvt.crop_pct == 0.875
    assert cvt.mean == pytest.approx((0.485, 0.456, 0.406)) and cvt.class_names is None
    # the checkpoint's config overrides the model's, and a runner's actual size wins
    model = vitlab.create_model("vl_test_vit")
    update_record(model, checkpoint={"path": "x", "config": {"preprocessing": {
        "interpolation": "bicubic", "crop_pct": 0.9, "mean": [0.5], "std": [0.25], "class_names": list("abcdefghij")}}})
    pre = resolve_preprocessing(vitlab.TorchRunner(model))
    assert (pre.interpolation, pre.crop_pct, pre.mean, pre.std) == ("bicubic", 0.9, (0.5,), (0.25,))
    assert pre.input_size == (1, 16, 16) and pre.class_names == tuple("abcdefghij")
    for bad, needle in [({"interpolation": "cubic"}, "'cubic'"), ({"crop_pct": 0}, "crop_pct 0"),
                        ({"crop_mode": "fill"}, "'fill'")]:
        update_record(model, checkpoint={"path": "x", "config": {"preprocessing": bad}})
        with pytest.raises(DataError, match=needle) as e:
            resolve_preprocessing(model)
        assert "\n" not in str(e.value)


def test_image_transform_resizes_short_side_and_crops():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))  # 30 wide, 40 high
    pre = Preprocessing(input_size=(1, 16, 16), mean=(0.5,), std=(0.5,))
    x = image_transform(pre)(rgb)
    expected = np.asarray(rgb.convert("L").resize((16, 21), Image.BILINEAR).crop((0, 2, 16, 18)), dtype=np.float32)
    torch.testing.assert_close(x, torch.from_numpy(expected / 255 - 0.5)[None] / 0.5)
    cropped = image_transform(Preprocessing(input_size=(3, 14, 14), mean=(0.5,) * 3, std=(0.5,) * 3,
                                            interpolation="bicubic", crop_pct=0.875))
    assert cropped(rgb).shape == (3, 14, 14)   # 16 x 21 (bicubic), centre 14 x 14
    squash = image_transform(Preprocessing(input_size=(1, 12, 20), mean=(0.5,), std=(0.5,), crop_mode="squash"))
    assert squash(rgb).shape == (1, 12, 20)


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p: p.write_bytes(b"\x89PNG not really"), "cannot read image"),
    (lambda p: p.mkdir(), "is a folder, not an image file"),
    (lambda p: None, "does not exist"),
])
def test_predict_bad_files_are_one_line(make, needle, reference, tmp_path, capsys):
    path = tmp_path / "x.png"
    make(path)
    assert main(["predict", str(reference), str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """A 3-class vl_test_vit checkpoint (names a, b, c) and a 3-class image folder with folders c, b, a."""
    base = tmp_path_factory.mktemp("three")
    model = vitlab.create_model("vl_test_vit", num_classes=3)
    pre = {**vitlab.checkpoint.default_preprocessing(model), "class_names": ["a", "b", "c"]}
    ck = vitlab.save_checkpoint(model, base / "ck", preprocessing=pre)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (base / "folder" / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(base / "folder" / name / f"{k}.png")
    return ck, base / "folder"


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_class_count_mismatch_is_refused_before_any_work(reference, three_class, capsys, monkeypatch):
    from vitlab import loader   # every verb loads through it

    monkeypatch.setattr(loader, "calibration_batches", lambda *a, **k: pytest.fail("calibrated before the check"))
    ck, folder = three_class
    err = _one_line_error(["eval", str(reference), "--data", f"imagefolder:{folder}", "--apply", "ptq"], capsys)
    assert "has 10 classes [T-shirt-top, Trouser" in err and "has 3 [a, b, c]" in err
    err = _one_line_error(["eval", str(ck), "--data", "fashion-mnist", "--apply", "ptq"], capsys)
    assert "has 3 classes [a, b, c]" in err and "fashion-mnist has 10 [T-shirt/top, Trouser" in err
    # a model by name has no config.json: the same check when the dataset is built
    err = _one_line_error(["eval", "vl_test_vit", "--data", f"imagefolder:{folder}"], capsys)
    assert "has 10 classes (names not stored)" in err and "has 3 [a, b, c]" in err


def test_class_names_checked_and_mapped(three_class, tmp_path, capsys):
    ck, folder = three_class
    pre = resolve_preprocessing(vitlab.create_model(ck))
    assert check_classes(pre, ["a", "b", "c"], f"imagefolder:{folder}") is None
    with pytest.warns(UserWarning, match=r"labelled in checkpoint .*'s order \[c, a, b\]"):
        assert check_classes(replace(pre, class_names=("c", "a", "b")), ["a", "b", "c"],
                             f"imagefolder:{folder}") == ["c", "a", "b"]
    with pytest.raises(DataError, match=r"\[a, b, c\] but imagefolder:.* has 3 \[a, b, x\]: the names differ"):
        check_classes(pre, ["a", "b", "x"], f"imagefolder:{folder}")
    fmnist = list(vitlab.data.FMNIST_CLASSES)
    with pytest.raises(DataError, match="another order"):  # only an image folder can be relabelled
        check_classes(replace(pre, num_classes=10, class_names=tuple(reversed(fmnist))), fmnist, "fashion-mnist")
    # synthetic data has no real names: only the count is compared
    assert check_classes(pre, ["class_0", "class_1", "class_2"], "synthetic:classes=3") is None
    # relabelled by name: label i is the checkpoint's class i
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    config = json.loads((ck / "config.json").read_text())
    config["preprocessing"]["class_names"] = ["c", "a", "b"]
    shutil.copytree(ck, tmp_path / "ck2")
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="matched by name"):
        data = dataset_for_model(vitlab.create_model(tmp_path / "ck2"), f"imagefolder:{renamed}", "test")
    assert data.classes == ["c", "a", "b"]
    assert {Path(p).parent.name: y for p, y in data.samples} == {"c": 0, "a": 1, "b": 2}
    # a different name set through the CLI: exit 2 with both lists
    (renamed / "c").rename(renamed / "x")
    err = _one_line_error(["eval", str(ck), "--data", f"imagefolder:{renamed}"], capsys)
    assert "[a, b, c]" in err and "[a, b, x]" in err


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:len(buf.getvalue()) // 2]


def test_eval_drops_unreadable_images_and_reports_them(three_class, tmp_path, capsys):
    ck, folder = three_class
    root = tmp_path / "bad"
    shutil.copytree(folder, root)
    (root / "a" / "truncated.jpg").write_bytes(_truncated_jpeg())   # passes verify(), fails to decode
    (root / "b" / "zero.png").write_bytes(b"")                      # found bad when the dataset is built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", str(ck), "--data", f"imagefolder:{root}", "--json", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["n"] == 6 and summary["skipped"] == 2 and "2 unreadable file(s) skipped" in out
    assert sorted(Path(p).name for p in summary["skipped_files"]) == ["truncated.jpg", "zero.png"]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["skipped"] == 2
    # n counts images read: the 6 good ones, each once (the truncated file is not replaced by its neighbour)
    assert sum(map(sum, json.loads((tmp_path / "ev" / "metrics.json").read_text())["confusion"])) == 6
    err = _one_line_error(["eval", str(ck), "--data", f"imagefolder:{root}", "--strict"], capsys)
    assert "zero.png" in err or "truncated.jpg" in err
