"""vitlab.data.calibration_batches: the one seeded calibration subset behind quantization and pruning."""
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.data import CalibrationError, DataError, calibration_batches, dataset_for_model

SYN = "synthetic:n=64,classes=10"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_vit", num_classes=10).eval()


def _expected(model, data, split, n, seed, *, skip=()):
    """The selection rule written out: the first `n` items of the seeded permutation, files in `skip` left out."""
    ds = dataset_for_model(model, data, split)
    order = [i for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
             if i not in skip][:n]
    return torch.stack([ds[i][0] for i in order]), torch.tensor([int(ds[i][1]) for i in order])


@pytest.mark.parametrize("data,split,n,seed,batch", [(SYN, "train", 20, 0, 8), (SYN, "val", 5, 3, 2),
                                                     ("fashion-mnist", "val", 40, 1, 16)])
def test_same_images_with_and_without_labels(tiny, data, split, n, seed, batch):
    model = tiny if data == SYN else vitlab.create_model("checkpoints/fashion-mnist-reference")
    images = calibration_batches(model, data, split, n, seed=seed, batch_size=batch)
    pairs = calibration_batches(model, data, split, n, seed=seed, batch_size=batch, labels=True)
    want_x, want_y = _expected(model, data, split, n, seed)
    assert [len(b) for b in images] == [len(x) for x, _ in pairs] == [len(b) for b in want_x.split(batch)]
    torch.testing.assert_close(torch.cat(images), want_x, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([x for x, _ in pairs]), want_x, rtol=0, atol=0)
    assert torch.equal(torch.cat([y for _, y in pairs]), want_y)
    other = calibration_batches(model, data, split, n, seed=seed + 1, batch_size=batch)
    assert not torch.equal(torch.cat(other), want_x)   # the seed chooses the subset


def test_old_names_give_the_same_batches(tiny):
    from vitlab.bench.measure import calibration_batches as measure_batches
    from vitlab.prune import PruneError, labelled_calibration

    assert measure_batches is calibration_batches
    got = labelled_calibration(tiny, SYN, "train", 20, seed=2, batch_size=8)
    want = calibration_batches(tiny, SYN, "train", 20, seed=2, batch_size=8, labels=True)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want, strict=True))
    big = "synthetic:n=600,classes=10"
    assert [len(x) for x, _ in labelled_calibration(tiny, big, "train")] == [64] * 8   # its defaults: 512 in 64s
    assert [len(x) for x in calibration_batches(tiny, big, "train")] == [32] * 8       # 256 in 32s
    with pytest.raises(PruneError, match="pruning on the test split is refused.*--split train"):
        labelled_calibration(tiny, SYN, "test", 8)
    with pytest.raises(PruneError, match="--calib-images must be >= 1, got 0"):
        labelled_calibration(tiny, SYN, "train", 0)


def test_refusals(tiny):
    with pytest.raises(CalibrationError, match="test split is refused.*--calib-split train"):
        calibration_batches(tiny, SYN, "test", 8)
    with pytest.raises(ValueError, match="--calib-images must be >= 1, got 0"):   # CalibrationError is a ValueError
        calibration_batches(tiny, SYN, "train", 0)
    five = "synthetic:n=64,classes=5"   # other classes than the model's: images alone are fine, labels are not
    assert sum(len(b) for b in calibration_batches(tiny, five, "train", 8)) == 8
    with pytest.raises(DataError):
        calibration_batches(tiny, five, "train", 8, labels=True)


def test_undecodable_file_is_skipped_in_order(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "train" / cls / f"{k}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "train" / "a" / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])  # passes verify()
    model = vitlab.create_model("vl_test_vit", num_classes=2)
    data = f"imagefolder:{tmp_path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the split warnings and the undecodable file's
        ds = dataset_for_model(model, data, "train")
        bad = {i for i, (path, _) in enumerate(ds.samples) if path.endswith("cut.jpg")}
        pairs = calibration_batches(model, data, "train", len(ds) - 1, labels=True, batch_size=4)
        want_x, want_y = _expected(model, data, "train", len(ds) - 1, 0, skip=bad)
    assert len(bad) == 1 and sum(len(x) for x, _ in pairs) == len(ds) - 1   # every good image once, none repeated
    torch.testing.assert_close(torch.cat([x for x, _ in pairs]), want_x, rtol=0, atol=0)
    assert torch.equal(torch.cat([y for _, y in pairs]), want_y)
