"""videofolder:PATH: users' clip files decoded with PyAV (frames sampled uniformly, in order), labels from class
folders, a corrupt file skipped with a VideoDecodeWarning, clear errors, and `vitlab train` on a folder of clips."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")

from vitlab.data import DataError, DataSpec, build_dataset, dataset_info  # noqa: E402
from vitlab.data.imagefolder import Skipped  # noqa: E402
from vitlab.data.videofolder import VideoDecodeWarning, VideoFolderDataset, sample_indices  # noqa: E402

H, W, N = 24, 32, 12   # frame size and frames per written clip


def write_clip(path: Path, red: list[int], green: int, codec: str = "png", pix_fmt: str = "rgb24") -> None:
    """A clip whose frame k has red = red[k], green = `green` everywhere and blue 200 on its left half."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        for level in red:
            img = np.zeros((H, W, 3), np.uint8)
            img[..., 0], img[..., 1], img[:, :W // 2, 2] = level, green, 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/train/{cat,dog}/ (3 clips each, lossless: PNG in AVI, FFV1 in MKV) + root/test/; one corrupt file."""
    root = tmp_path_factory.mktemp("clips")
    for split, count in (("train", 3), ("test", 1)):
        for c, name in enumerate(("dog", "cat")):   # written in reverse order: labels must still sort
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                lossless = ("png", "rgb24", ".avi") if i % 2 == 0 else ("ffv1", "bgr0", ".mkv")
                write_clip(d / f"clip{i}{lossless[2]}", [10 * k + i for k in range(N)], 100 * c, *lossless[:2])
    (root / "train" / "cat" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    return root


def build(folder: Path, split: str = "train", **kw) -> VideoFolderDataset:
    kw = {"img_size": (H, W), "in_chans": 3, "mean": 0.0, "std": 1.0, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        return build_dataset(f"videofolder:{folder}:frames=4", split, **kw)


def test_spec_and_info(folder):
    spec = DataSpec.parse(f"videofolder:{folder}:frames=4")
    assert spec.path == str(folder) and spec.option("frames") == 4 and DataSpec.parse(str(spec)) == spec
    assert DataSpec.parse(f"videofolder:{folder}").option("frames") == 10
    assert dataset_info(spec)["classes"] == ["cat", "dog"]
    with pytest.raises(DataError, match="needs a path"):
        DataSpec.parse("videofolder")
    with pytest.raises(DataError, match="unknown option 'fps'"):
        DataSpec.parse(f"videofolder:{folder}:fps=4")


def test_sample_indices_are_segment_centres():
    assert sample_indices(12, 4) == [1, 4, 7, 10]
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]   # a short clip repeats frames


def test_frames_order_labels_and_values(folder):
    ds = build(folder)
    assert ds.classes == ["cat", "dog"] and len(ds) + len(build(folder, "val")) == 6
    for (path, label), k in zip(ds.samples, range(len(ds))):
        x, y = ds[k]
        assert x.shape == (3, 4, H, W) and y == label == (0 if "/cat/" in path else 1)
        offset = int(Path(path).stem[-1])
        red = [10 * j + offset for j in sample_indices(N, 4)]   # frames 1, 4, 7, 10, in order
        torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(red) / 255.0, rtol=0, atol=1e-6)
        torch.testing.assert_close(x[1].unique(), torch.tensor([100.0 * (1 - y) / 255]), rtol=0, atol=1e-6)
        assert torch.all(x[2, :, :, :W // 2] == 200 / 255) and torch.all(x[2, :, :, W // 2:] == 0)


def test_gray_resize_and_normalise(folder):
    ds = build(folder, "test", in_chans=1, img_size=16, mean=0.5, std=0.25)
    x, y = ds[0]
    assert x.shape == (1, 4, 16, 16)
    r, g = 10 * sample_indices(N, 4)[0], 100 * (1 - y)
    luma = (0.299 * r + 0.587 * g + 0.114 * 0) / 255   # right half: no blue (PIL 'L' weights)
    torch.testing.assert_close(x[0, 0, 8, -1], torch.tensor((luma - 0.5) / 0.25), rtol=0, atol=1e-4)


def test_corrupt_file_is_skipped_with_a_named_warning(folder):
    with pytest.warns(VideoDecodeWarning, match=r"broken\.mp4"):
        ds = build_dataset(f"videofolder:{folder}:frames=4", "train", img_size=(H, W), in_chans=3)
    assert len(ds.bad) == 1 and ds.bad[0].endswith("broken.mp4")
    assert all("broken" not in p for p, _ in ds.samples)


def test_decode_failure_mid_epoch_warns_and_moves_on(folder, monkeypatch):
    ds = build(folder)
    failing = ds.samples[0][0]
    import vitlab.data.videofolder as vf

    real = vf.decode_clip

    def decode(path: str, frames: int) -> torch.Tensor:   # this file opens (probe) but fails to decode
        if path == failing:
            raise av.InvalidDataError(1, "Invalid data found when processing input")
        return real(path, frames)

    monkeypatch.setattr(vf, "decode_clip", decode)
    with pytest.warns(VideoDecodeWarning, match="cannot decode it"):
        x, y = ds[0]
    assert y == ds.samples[1][1] and failing.split("/")[-1] in ds.bad[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the second time: skipped silently, no second warning
        ds[0]
        skipped = ds.get_or_skip(0)      # evaluation: reported, not replaced
    assert isinstance(skipped, Skipped) and skipped.path.endswith(failing.split("/")[-1])


def test_errors_name_the_fix(folder, tmp_path, monkeypatch):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no video files"):
        build_dataset(f"videofolder:{tmp_path / 'empty'}", "test")
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(f"videofolder:{tmp_path / 'nope'}", "test")
    with pytest.raises(DataError, match="in_chans=1 or 3"):
        build(folder, in_chans=2)
    monkeypatch.setitem(sys.modules, "av", None)   # `import av` raises ImportError
    with pytest.raises(DataError, match=r"pip install 'vitlab\[video\]'"):
        build(folder)


def test_lossy_mp4_decodes(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        write_clip(tmp_path / c / "x.mp4", [20 * k for k in range(N)], 50, codec="mpeg4", pix_fmt="yuv420p")
    ds = build_dataset(f"videofolder:{tmp_path}:frames=3", "test", img_size=(H, W), in_chans=3, mean=0.0, std=1.0)
    x, _ = ds[0]
    assert x.shape == (3, 3, H, W)
    expected = torch.tensor([20.0 * j for j in sample_indices(N, 3)]) / 255
    assert (x[0, :, H // 2, W // 2] - expected).abs().max() < 8 / 255   # mpeg4 + yuv420p: close, not exact


def test_train_one_step_on_a_video_folder(folder, tmp_path):
    from vitlab.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoDecodeWarning)
        code = main(["train", "--model", "vl_test_vivit", "--data", f"videofolder:{folder}:frames=10", "--out",
                     str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--max-steps", "1", "--threads", "1"])
    assert code == 0 and (tmp_path / "run").is_dir()
