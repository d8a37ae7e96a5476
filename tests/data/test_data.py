"""Tests of vitlab.data: specs, splits, Fashion-MNIST (installed at /usr/share/datasets), image folders, synthetic."""
import gzip
import io
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import (SPLITS, DataError, DatasetNotFoundError, DataSpec, FMNIST_DIR, FMNIST_MEAN, FMNIST_STD,
                         build_dataset, dataset_info)
from vitlab.data.fashion_mnist import _read_idx_cached
from vitlab.data.imagefolder import load_image
from vitlab.data.transforms import display_name

import vitlab


# --------------------------------------------------------------------------------------------------------- specs

@pytest.mark.parametrize("text", ["fashion-mnist", "imagefolder:/x", "imagefolder:rel/dir", "synthetic",
                                  "synthetic:n=64,classes=5", "synthetic:classes=3"])
def test_spec_round_trip(text):
    spec = DataSpec.parse(text)
    assert str(spec) == text
    assert DataSpec.parse(str(spec)) == spec
    assert DataSpec.parse(spec) is spec


def test_spec_fields_and_alias():
    assert DataSpec.parse("imagefolder:/data/x") == DataSpec("imagefolder", path="/data/x")
    assert DataSpec.parse("synthetic:n=64,classes=5").options == (("n", "64"), ("classes", "5"))
    assert DataSpec.parse("synthetic:n=64").option("n") == 64
    assert DataSpec.parse("synthetic:n=64").option("classes") == 10
    assert DataSpec.parse("fmnist") == DataSpec("fashion-mnist")


@pytest.mark.parametrize("text, named", [("nope", "'nope'"), ("imagefolder", "'imagefolder'"),
                                         ("imagefolder:", "'imagefolder'"), ("synthetic:n=0", "n='0'"),
                                         ("synthetic:size=3", "'size'"), ("synthetic:n", "'n'"),
                                         ("fashion-mnist:/x", "--data-dir"),
                                         ("NOPE:x", "'NOPE:x'"), ("synthetic:n=2,n=3", "n=2,n=3")])
def test_bad_specs(text, named):
    with pytest.raises(DataError) as e:
        DataSpec.parse(text)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_bad_split_and_args():
    with pytest.raises(DataError, match="'training'.*train, val, test"):
        build_dataset("synthetic", "training")
    with pytest.raises(DataError, match=r"img_size=0"):
        build_dataset("synthetic", img_size=0)
    with pytest.raises(DataError, match=r"mean=.*in_chans=3"):
        build_dataset("synthetic", in_chans=3, mean=(0.1, 0.2))
    with pytest.raises(DataError, match="'hflipp'"):
        build_dataset("synthetic", aug={"hflipp": 0.5})
    with pytest.raises(DataError, match="must be a string"):
        DataSpec.parse(3)


# ----------------------------------------------------------------------------------------------------- synthetic

def test_synthetic():
    a = build_dataset("synthetic:n=32,classes=5", "train", img_size=(12, 16), in_chans=3)
    b = build_dataset("synthetic:n=32,classes=5", "train", img_size=(12, 16), in_chans=3)
    assert len(a) == 32 and a.num_classes == 5 and a.classes[0] == "class_0" and a.split == "train"
    for i in (0, 7, 31, -1):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert xa.shape == (3, 12, 16) and xa.dtype == torch.float32
        assert torch.equal(xa, xb) and ya == yb and 0 <= ya < 5
    labels = a.targets
    assert labels.min() >= 0 and labels.max() < 5 and len(labels.unique()) > 1
    x = torch.stack([a[i][0] for i in range(len(a))])
    assert abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1
    assert not torch.equal(a[0][0], a[1][0])
    val, test = (build_dataset("synthetic:n=32,classes=5", s, img_size=(12, 16), in_chans=3) for s in ("val", "test"))
    assert not torch.equal(a[0][0], val[0][0]) and not torch.equal(val[0][0], test[0][0])
    assert not torch.equal(build_dataset("synthetic", seed=1)[0][0], build_dataset("synthetic", seed=0)[0][0])
    assert build_dataset("synthetic", "train")[0][0].shape == (1, 28, 28) and len(build_dataset("synthetic")) == 256
    with pytest.raises(IndexError):
        a[32]


# ------------------------------------------------------------------------------------------------- fashion-mnist

@pytest.fixture(scope="module")
def fmnist():
    return {split: build_dataset("fashion-mnist", split) for split in SPLITS}


def test_fmnist_splits(fmnist):
    train, val, test = fmnist["train"], fmnist["val"], fmnist["test"]
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert train.num_classes == 10 and train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert str(train.spec) == "fashion-mnist" and val.split == "val"
    tr, va = set(train.indices.tolist()), set(val.indices.tolist())
    assert not tr & va and tr | va == set(range(60000))
    # the hold-out is fixed forever: a change here (e.g. of torch.randperm) silently changes every val number
    assert val.indices[:5].tolist() == [1, 3, 47, 49, 80]
    assert torch.equal(build_dataset("fashion-mnist", "val").indices, val.indices)
    assert not torch.equal(build_dataset("fashion-mnist", "val", seed=1).indices, val.indices)


def test_fmnist_items_match_raw_files(fmnist):
    with gzip.open(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = f.read()[8:]
    with gzip.open(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        first = torch.tensor(list(f.read()[16:16 + 784]), dtype=torch.float32).view(1, 28, 28)
    test = fmnist["test"]
    x, y = test[0]
    assert y == labels[0] == 9 and isinstance(y, int)
    assert [test[i][1] for i in range(20)] == list(labels[:20])
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x * FMNIST_STD[0] + FMNIST_MEAN[0], first / 255)
    batch = torch.stack([test[i][0] for i in range(0, 10000, 3)])
    assert abs(batch.mean()) < 0.05 and abs(batch.std() - 1) < 0.05
    assert torch.equal(test[5][0], build_dataset("fashion-mnist", "test")[5][0])


def test_fmnist_decoded_once(fmnist):
    misses = _read_idx_cached.cache_info().misses
    build_dataset("fashion-mnist", "train")
    build_dataset("fashion-mnist", "test")
    assert _read_idx_cached.cache_info().misses == misses


def test_fmnist_resize_and_channels(fmnist):
    assert build_dataset("fashion-mnist", img_size=56)[0][0].shape == (1, 56, 56)
    x = build_dataset("fashion-mnist", img_size=(14, 20))[0][0]
    assert x.shape == (1, 14, 20)
    with pytest.raises(DataError) as e:
        build_dataset("fashion-mnist", in_chans=3, img_size=224)
    assert "1x28x28" in str(e.value) and "3x224x224" in str(e.value) and "in_chans=1" in str(e.value)


def test_fmnist_train_aug(fmnist):
    plain = fmnist["train"]
    fill = -FMNIST_MEAN[0] / FMNIST_STD[0]
    flip = build_dataset("fashion-mnist", "train", train_aug=True, aug={"hflip": 1.0, "crop_padding": 0})
    assert torch.equal(flip[3][0], plain[3][0].flip(-1)) and flip[3][1] == plain[3][1]
    crop = build_dataset("fashion-mnist", "train", train_aug=True, aug={"hflip": 0.0})
    assert crop.crop_padding == 2
    x0 = torch.nn.functional.pad(plain[3][0], (2, 2, 2, 2), value=fill)
    torch.manual_seed(0)
    shifted = 0
    for _ in range(20):  # every output is some 28x28 window of the zero-padded image
        x = crop[3][0]
        windows = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(x, x0[:, dy:dy + 28, dx:dx + 28])]
        assert windows, "augmented image is not a crop of the padded image"
        shifted += (2, 2) not in windows
    assert shifted > 10
    torch.manual_seed(1)
    a = crop[3][0]
    torch.manual_seed(1)
    assert torch.equal(a, crop[3][0])  # the global torch seed controls augmentation
    erase = build_dataset("fashion-mnist", "train", train_aug=True, aug={"re_prob": 1.0, "hflip": 0.0,
                                                                          "crop_padding": 0})
    assert ((erase[3][0] == 0) & (plain[3][0] != 0)).any()
    with pytest.raises(DataError, match="crop_paddin'.*crop_padding"):
        build_dataset("fashion-mnist", "train", train_aug=True, aug={"crop_paddin": 2})


def test_fmnist_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_truncated_idx(tmp_path, gz):
    os.symlink(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz"), tmp_path / "t10k-images-idx3-ubyte.gz")
    with open(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz"), "rb") as f:
        raw = f.read()
    name = "t10k-labels-idx1-ubyte" + (".gz" if gz else "")
    (tmp_path / name).write_bytes(raw[:len(raw) // 2] if gz else gzip.decompress(raw)[:5000])
    with pytest.raises(DataError, match=name):
        build_dataset("fashion-mnist", "test", data_dir=str(tmp_path))


def test_fmnist_bad_magic(tmp_path):
    os.symlink(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz"), tmp_path / "t10k-images-idx3-ubyte.gz")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x89PNG" + bytes(100))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not an idx"):
        build_dataset("fashion-mnist", "test", data_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------- imagefolder

def _good_images(folder, seed):
    """One small image per PIL mode the loader must handle."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    rgb.save(folder / "rgb.jpg")
    rgb.convert("L").save(folder / "l.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("P").save(folder / "p.png")
    rgb.convert("1").save(folder / "bw.bmp")


def _truncated_jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:len(buf.getvalue()) // 2]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{train,val,test}/{cat,dog}/ with good images, plus corrupt, empty and truncated files in train/cat."""
    root = tmp_path_factory.mktemp("imagefolder")
    for i, split in enumerate(SPLITS):
        for j, cls in enumerate(("cat", "dog")):
            _good_images(root / split / cls, 10 * i + j)
    bad = root / "train" / "cat"
    (bad / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(_truncated_jpeg())
    (bad / "notes.txt").write_text("not an image and not an image extension: ignored silently")
    return root


def _build_quietly(spec, split, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_dataset(spec, split, **kw)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_imagefolder_shapes(tree, in_chans):
    kw = dict(img_size=16, in_chans=in_chans, mean=(0.5,), std=(0.5,))
    with pytest.warns(UserWarning) as record:
        train = build_dataset(f"imagefolder:{tree}", "train", **kw)
    messages = " ".join(str(w.message) for w in record)
    assert "corrupt.png" in messages and "empty.jpg" in messages and "truncated.jpg" not in messages
    assert train.classes == ["cat", "dog"] and train.num_classes == 2
    assert len(train) == 13 and sorted(set(train.targets.tolist())) == [0, 1]
    assert not any(p.endswith(("corrupt.png", "empty.jpg", "notes.txt")) for p, _ in train.samples)
    for split in ("val", "test"):
        ds = build_dataset(f"imagefolder:{tree}", split, **kw)
        assert len(ds) == 12
        for i in range(len(ds)):
            x, y = ds[i]
            assert type(x) is torch.Tensor and x.shape == (in_chans, 16, 16) and x.dtype == torch.float32
            assert y == ds.samples[i][1] and -1.0 <= x.min() and x.max() <= 1.0
    wide = build_dataset(f"imagefolder:{tree}", "test", **{**kw, "img_size": (12, 20)})
    assert wide[0][0].shape == (in_chans, 12, 20)
    aug = _build_quietly(f"imagefolder:{tree}", "train", **kw, train_aug=True, aug={"re_prob": 0.5})
    torch.manual_seed(0)
    a = aug[1][0]
    torch.manual_seed(0)
    assert a.shape == (in_chans, 16, 16) and torch.equal(a, aug[1][0])


def test_imagefolder_dataloader_survives_truncated(tree):
    ds = _build_quietly(f"imagefolder:{tree}", "train", img_size=16, in_chans=3, mean=(0.5,), std=(0.5,))
    with pytest.warns(UserWarning, match="truncated.jpg"):
        seen = sum(len(y) for _, y in torch.utils.data.DataLoader(ds, batch_size=4))
    assert seen == len(ds) and any(p.endswith("truncated.jpg") for p in ds.bad)


def test_imagefolder_strict(tree, tmp_path):
    with pytest.raises(DataError, match=r"corrupt\.png|empty\.jpg"):
        build_dataset(f"imagefolder:{tree}", "train", img_size=16, in_chans=3, mean=(0.5,), std=(0.5,), strict=True)
    _good_images(tmp_path / "a", 0)
    (tmp_path / "a" / "truncated.jpg").write_bytes(_truncated_jpeg())
    ds = build_dataset(f"imagefolder:{tmp_path}", "test", img_size=16, strict=True)
    index = [p for p, _ in ds.samples].index(str(tmp_path / "a" / "truncated.jpg"))
    with pytest.raises(DataError, match="truncated.jpg"):
        ds[index]


def test_imagefolder_modes(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "clear_la.png")
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 255)).save(tmp_path / "black.jpg")
    for name, value in [("clear.png", 255), ("clear_la.png", 255), ("white16.png", 255), ("black.jpg", 0)]:
        for in_chans, mode in [(1, "L"), (3, "RGB")]:
            im = load_image(str(tmp_path / name), in_chans)
            assert im.mode == mode and abs(int(np.asarray(im).mean()) - value) <= 2, (name, mode)


def test_imagefolder_layouts(tmp_path, tree):
    flat = tmp_path / "flat"
    for cls in ("a", "b", "c"):
        for k in range(4):
            _good_images(flat / cls / str(k), k)
    spec = f"imagefolder:{flat}"
    with pytest.warns(UserWarning, match="no separate test set"):
        train = build_dataset(spec, "train", img_size=8)
    with pytest.warns(UserWarning, match="no separate test set"):
        val = build_dataset(spec, "val", img_size=8)
    test = build_dataset(spec, "test", img_size=8)
    assert len(test) == 72 and (len(train), len(val)) == (65, 7)
    assert not set(train.samples) & set(val.samples) and set(train.samples) | set(val.samples) == set(test.samples)
    assert dataset_info(spec) == {"kind": "imagefolder", "num_classes": 3, "classes": ["a", "b", "c"],
                                  "native_shape": None}
    # train/ without val/ and test/: val is a 10 % hold-out of train/, test is an error that says so
    nested = tmp_path / "nested"
    _good_images(nested / "train" / "x", 0)
    _good_images(nested / "train" / "y", 1)
    train, val = (build_dataset(f"imagefolder:{nested}", s, img_size=8) for s in ("train", "val"))
    assert (len(train), len(val)) == (11, 1) and not set(train.samples) & set(val.samples)
    with pytest.raises(DataError, match="no test/ folder"):
        build_dataset(f"imagefolder:{nested}", "test")
    _good_images(nested / "test" / "zebra", 0)
    with pytest.raises(DataError, match="zebra"):
        build_dataset(f"imagefolder:{nested}", "test")


def test_imagefolder_bad_roots(tmp_path, tree):
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        build_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders in .*empty"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in .*noimg"):
        build_dataset(f"imagefolder:{tmp_path / 'noimg'}")
    with pytest.raises(DataError, match="in_chans=2"):
        build_dataset(f"imagefolder:{tree}", in_chans=2)


def test_dataset_info():
    assert dataset_info("fashion-mnist") == {
        "kind": "fashion-mnist", "num_classes": 10, "native_shape": (1, 28, 28),
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"]}
    info = dataset_info("synthetic:classes=4")
    assert info["num_classes"] == 4 and info["native_shape"] is None and info["kind"] == "synthetic"


# ----------------------------------------------------------------------------------------- odd folders and files

def _png(path, size=(6, 6), value=128):
    _mk(path)
    Image.new("L", size, value).save(path)


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _quiet_build(spec, split="test", **kw):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = build_dataset(spec, split, img_size=8, **kw)
    return ds, " | ".join(str(w.message) for w in record)


def test_imagefolder_symlink_loop_counts_each_file_once(tmp_path):
    root = tmp_path / "loop"
    _png(root / "a" / "1.png")
    _png(root / "b" / "2.png")
    os.symlink(root / "a", root / "a" / "again")      # a loop: a/again/again/... grew the folder to 902 images
    os.symlink(root, root / "b" / "up")               # a loop through the root
    os.symlink(root / "a" / "1.png", root / "b" / "same.png")   # one file reached twice
    os.link(root / "b" / "2.png", root / "b" / "hard.png")      # a hard link is the same file too
    ds, messages = _quiet_build(f"imagefolder:{root}")
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == ["1.png", "2.png"]
    assert "symbolic link loop" in messages and "counting" in messages and "same file" in messages
    # a linked folder reached once is read (once)
    other = tmp_path / "elsewhere"
    _png(other / "3.png")
    os.symlink(other, root / "a" / "linked")
    ds, _ = _quiet_build(f"imagefolder:{root}")
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == ["1.png", "2.png", "3.png"]


def test_imagefolder_odd_files_are_read_or_reported(tmp_path):
    root = tmp_path / "odd"
    rgba = Image.new("RGBA", (5, 7), (0, 0, 0, 0))                # fully transparent: white on white
    rgba.save(_mk(root / "x" / "alpha.png"))
    Image.fromarray(np.full((3, 9), 65535, dtype=np.uint16)).save(root / "x" / "sixteen.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 255)).save(root / "x" / "cmyk.jpg")
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(root / "x" / "palette.png", transparency=0)        # transparent palette index: white
    Image.new("L", (1, 1), 0).save(root / "x" / "one.png")       # 1x1: resized up
    (root / "x" / "zero.png").write_bytes(b"")                   # zero bytes: skipped with a report
    Image.new("LAB", (4, 4), (0, 0, 0)).save(root / "x" / "lab.tif")  # 'A' is a band, not alpha
    bad_name = os.fsdecode(b"caf\xe9.png")                       # not UTF-8
    Image.new("L", (4, 4), 0).save(root / "x" / bad_name)
    (root / "empty_class").mkdir()
    ds, messages = _quiet_build(f"imagefolder:{root}", in_chans=3, mean=(0.0,), std=(1.0,))
    assert "zero.png: empty file (0 bytes)" in messages and "empty_class has no images" in messages
    assert ds.classes == ["empty_class", "x"] and any(b.endswith("zero.png") for b in ds.bad)
    values = {os.path.basename(p): ds[i][0] for i, (p, _) in enumerate(ds.samples)}
    assert all(v.shape == (3, 8, 8) for v in values.values())
    white = {k for k, v in values.items() if torch.allclose(v, torch.ones_like(v), atol=0.02)}
    black = {k for k, v in values.items() if v.abs().max() < 0.02}
    assert white == {"alpha.png", "sixteen.png", "palette.png"} and {"cmyk.jpg", "one.png", bad_name} <= black
    json.dumps({"skipped": ds.bad, "files": [display_name(p) for p, _ in ds.samples]}, ensure_ascii=False)
    assert any("caf\\xe9.png" in display_name(p) for p, _ in ds.samples)


def test_imagefolder_non_utf8_class_folder(tmp_path):
    root = tmp_path / "names"
    _png(root / os.fsdecode(b"\xff-class") / "a.png")
    _png(root / "plain" / "b.png")
    ds, _ = _quiet_build(f"imagefolder:{root}")
    assert ds.classes == ["plain", "\\xff-class"] and len(ds) == 2 and ds[1][0].shape == (1, 8, 8)
    print(ds.classes)  # printable: no UnicodeEncodeError
    assert dataset_info(f"imagefolder:{root}")["classes"] == ds.classes


def test_imagefolder_with_no_images_is_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="no images in") as e:
        _quiet_build(f"imagefolder:{tmp_path}")
    assert "\n" not in str(e.value)
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 image files"):
        _quiet_build(f"imagefolder:{tmp_path}")


def test_get_or_skip_never_substitutes(tree):
    from vitlab.data.imagefolder import Skipped

    ds = _build_quietly(f"imagefolder:{tree}", "train", img_size=16, in_chans=3, mean=(0.5,), std=(0.5,))
    index = [p for p, _ in ds.samples].index(str(tree / "train" / "cat" / "truncated.jpg"))
    with pytest.warns(UserWarning, match="truncated.jpg"):
        item = ds.get_or_skip(index)
    assert isinstance(item, Skipped) and item.path.endswith("truncated.jpg")
    assert isinstance(ds.get_or_skip(index), Skipped)          # remembered: no second decode attempt
    x, y = ds[index]                                            # a training loader still gets an item
    assert x.shape == (3, 16, 16)


def test_fashion_mnist_for_a_model_is_unchanged():
    from vitlab.data.transforms import dataset_for_model

    model = vitlab.create_model("vl_test_vit")       # 1x16x16: Fashion-MNIST is resized as before
    ours = dataset_for_model(model, "fashion-mnist", "val")
    theirs = build_dataset("fashion-mnist", "val", img_size=16, mean=FMNIST_MEAN, std=FMNIST_STD)
    for i in (0, 17, 4999):
        assert torch.equal(ours[i][0], theirs[i][0]) and ours[i][1] == theirs[i][1]
