"""A folder of video clips, one sub-folder per class, decoded with PyAV: `videofolder:PATH[:frames=T]`.

Layouts and splits follow `imagefolder` (imagefolder.py): `PATH/train/CLASS/*` with optional `PATH/val/` and
`PATH/test/` (without `val/`, val is a seeded 10 % hold-out of train/; without `test/`, the test split is an error),
or a flat `PATH/CLASS/*` (test is the whole folder, train/val a seeded 90/10 split of it, with a warning). Classes are
the sorted class folders (torchvision's ImageFolder order), or the model's class order when it names them. Files are
the ones ending in VIDEO_EXTENSIONS, in any container and codec FFmpeg (PyAV) decodes.

A clip is decoded whole and `frames` frames (default 10) are sampled uniformly over it: frame
floor((i + 1/2) * n / T) of its n frames for i = 0..T-1 (the centre of each of T equal segments, TSN's test-time
sampling; a clip shorter than T repeats frames). Frames are converted to RGB or to luminance (PIL's 'L':
(299 R + 587 G + 114 B) / 1000), resized to the model's (H, W) (bilinear, antialias), scaled to [0, 1] and
normalised with the model's mean / std: items are (C, T, H, W). With `train_aug`, the whole clip is flipped left-right
with probability `hflip` (one draw per clip, so the motion stays consistent); other image augmentations are ignored.

A file PyAV cannot open is left out when the dataset is built, one `VideoDecodeWarning` naming the file and the
decoder's message; a file that opens but fails to decode later warns once the same way and is replaced by the next
decodable clip in training (`ds[i]`), or reported as a `Skipped` record by `get_or_skip(i)` (what `evaluate` uses:
dropped, never replaced) — never a crash mid-epoch. `.bad` lists the files left out.
"""
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .imagefolder import Skipped
from .spec import DataError, DataSpec, DatasetNotFoundError, VisionDataset, check_aug, holdout, to_size, to_stats
from .transforms import display_name

__all__ = ["VideoFolderDataset", "VideoDecodeWarning", "VIDEO_EXTENSIONS", "decode_clip", "sample_indices",
           "video_classes"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif", ".flv", ".wmv")
VAL_FRACTION = 0.1
INSTALL = "pip install 'vitlab[video]'"


class VideoDecodeWarning(UserWarning):
    """A video file that could not be opened or decoded was skipped (the message names the file and why)."""


def _av():
    try:
        import av
    except ImportError:
        raise DataError(f"videofolder decodes clips with PyAV, which is not installed: {INSTALL}") from None
    return av


def sample_indices(n: int, frames: int) -> list[int]:
    """Indices of `frames` frames spread uniformly over n: floor((i + 0.5) * n / frames), the segment centres."""
    return [int((i + 0.5) * n / frames) for i in range(frames)]


def decode_clip(path: str, frames: int) -> torch.Tensor:
    """`frames` RGB frames (T, 3, H, W) uint8 sampled uniformly over the first video stream of `path`.

    Raises whatever PyAV raises (av.FFmpegError, OSError, ...) for an unreadable file, ValueError for no video.
    """
    av = _av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream in the file")
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]  # n x (H, W, 3) uint8
    if not decoded:
        raise ValueError("the video stream has no frames")
    picked = [torch.from_numpy(decoded[i]) for i in sample_indices(len(decoded), frames)]
    return torch.stack(picked).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)


def _probe(path: str) -> str | None:
    """Why PyAV cannot open `path` as a video (cheap: header only), or None."""
    av = _av()
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream in the file"
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        return f"{type(e).__name__}: {display_name(str(e))}"
    return None


def _class_folders(root: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {display_name(str(root))}: put clips in "
                        f"{display_name(str(root))}/CLASS_NAME/ (one sub-folder per class)")
    return classes


def _root(spec: DataSpec) -> Path:
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"video folder {display_name(str(root))} does not exist: pass an existing folder "
                                   f"as 'videofolder:PATH'")
    if not root.is_dir():
        raise DataError(f"{display_name(str(root))} is not a folder: pass a folder with one sub-folder of clips per "
                        f"class as 'videofolder:PATH'")
    return root


def video_classes(spec: DataSpec) -> list[str]:
    """Class names (display form) of a videofolder spec: the sub-folders of PATH/train if present, else of PATH."""
    root = _root(spec)
    return [display_name(c) for c in _class_folders(root / "train" if (root / "train").is_dir() else root)]


def _scan(folder: Path, class_dirs: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every video-extension file under folder/CLASS/ (recursively, sorted)."""
    extra = sorted(set(_class_folders(folder)) - set(class_dirs))
    if extra:
        raise DataError(f"{display_name(str(folder))} has class folder(s) {[display_name(e) for e in extra]} that the "
                        f"training classes lack: make the class folders of train/, val/ and test/ match")
    samples = []
    for label, name in enumerate(class_dirs):
        for dirpath, dirnames, filenames in os.walk(folder / name):
            dirnames.sort()
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                        if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS)]
    if not samples:
        raise DataError(f"no video files in {display_name(str(folder))}: expected files ending in "
                        f"{', '.join(VIDEO_EXTENSIONS)} under {display_name(str(folder))}/CLASS_NAME/")
    return samples


def _split(split: str, root: Path, seed: int, classes: list[str] | None) -> tuple[list[str], list, Path]:
    """(class folders in label order, samples, folder read) of `split`: imagefolder's layout rules."""
    nested = (root / "train").is_dir()
    source = root / "train" if nested else root
    found = _class_folders(source)
    if classes is not None:
        by_name = {display_name(c): c for c in found}
        if sorted(by_name) != sorted(classes):
            raise DataError(f"{display_name(str(source))} has class folders {sorted(by_name)}, not the classes "
                            f"{list(classes)} asked for: use data with those classes")
        found = [by_name[c] for c in classes]
    if nested and (split == "test" or (split == "val" and (root / "val").is_dir())):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{display_name(str(root))} has train/ but no test/ folder: add "
                            f"{display_name(str(folder))} with one sub-folder per class, or evaluate on split 'val'")
        return found, _scan(folder, found), folder
    samples = _scan(source, found)
    if (not nested and split == "test") or (nested and (root / "val").is_dir()):
        return found, samples, source
    if not nested:
        warnings.warn(f"{display_name(str(root))} has no train/ folder, so there is no separate test set: train and "
                      f"val are a 90/10 split of the whole folder, and split 'test' is the whole folder", stacklevel=4)
    if len(samples) < 2:
        raise DataError(f"{display_name(str(source))} has {len(samples)} clip(s), too few for a train/val hold-out: "
                        f"add clips or a {display_name(str(root))}/val folder")
    train_idx, val_idx = holdout(len(samples), max(1, round(len(samples) * VAL_FRACTION)), seed)
    return found, [samples[i] for i in (train_idx if split == "train" else val_idx).tolist()], source


class VideoFolderDataset(VisionDataset):
    """Clips of one split of a video folder as normalised float tensors (in_chans, T, H, W); in_chans is 1 or 3.

    Attributes beyond the common ones: `root`, `samples` (list of (path, label)), `num_frames`, `bad` (display
    names of the files left out so far).
    """

    AUG_DEFAULTS = {"hflip": 0.0, "re_prob": 0.0, "crop_padding": None}

    def __init__(
            self,
            spec: DataSpec | str,
            split: str = "test",
            *,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            mean=(0.5,),
            std=(0.5,),
            train_aug: bool = False,
            aug: dict | None = None,
            seed: int = 0,
            frames: int = 10,
            classes: list[str] | None = None,
    ):
        _av()
        size = to_size(img_size)
        if in_chans not in (1, 3):
            raise DataError(f"videofolder reads frames as luminance (in_chans=1) or RGB (in_chans=3), not "
                            f"in_chans={in_chans}: create the model with in_chans=1 or 3")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise DataError(f"videofolder:frames={frames!r} must be a positive int, e.g. frames=16")
        mean, std = to_stats(mean, std, in_chans)
        self._mean, self._std = torch.tensor(mean).view(-1, 1, 1, 1), torch.tensor(std).view(-1, 1, 1, 1)
        self.hflip = float(check_aug(aug, self.AUG_DEFAULTS, "videofolder")["hflip"]) if train_aug else 0.0
        self.spec, self.split = DataSpec.parse(spec), split
        self.input_size, self.num_frames, self.train_aug = (in_chans, *size), frames, train_aug
        self.root = _root(self.spec)
        class_dirs, samples, folder = _split(split, self.root, seed, classes)
        self.classes = [display_name(c) for c in class_dirs]
        self.bad: list[str] = []
        good = []
        for path, label in samples:
            reason = _probe(path)
            if reason is None:
                good.append((path, label))
            else:
                self._skip(path, reason)
        if not good:
            raise DataError(f"none of the {len(samples)} video files in {display_name(str(folder))} can be opened by "
                            f"PyAV: check the files")
        self.samples = good
        self._labels = [label for _, label in good]

    def __len__(self) -> int:
        return len(self.samples)

    def _skip(self, path: str, reason: str) -> None:
        self.bad.append(display_name(path))
        warnings.warn(f"skipping video {display_name(path)}: {reason}", VideoDecodeWarning, stacklevel=3)

    def clip(self, index: int) -> torch.Tensor:
        """Clip `index` as normalised (C, T, H, W), unaugmented; raises what the decoder raises."""
        frames = decode_clip(self.samples[index][0], self.num_frames).float()  # (T, 3, H0, W0) in 0..255
        if self.input_size[0] == 1:
            frames = (frames * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(frames.shape[-2:]) != self.input_size[1:]:
            frames = F.interpolate(frames, size=self.input_size[1:], mode="bilinear", align_corners=False,
                                   antialias=True).clamp_(0, 255)
        return (frames.transpose(0, 1) / 255.0 - self._mean) / self._std  # (C, T, H, W)

    def _decoded(self, j: int) -> torch.Tensor | None:
        """Clip j, or None (with one VideoDecodeWarning the first time) if its file does not decode."""
        av = _av()
        path = self.samples[j][0]
        if display_name(path) in self.bad:
            return None
        try:
            return self.clip(j)
        except (av.FFmpegError, OSError, ValueError, EOFError) as e:
            self._skip(path, f"cannot decode it ({type(e).__name__}: {display_name(str(e))})")
            return None

    def get_or_skip(self, index: int) -> "tuple[torch.Tensor, int] | Skipped":
        """Clip `index` unaugmented, or a `Skipped` record if its file cannot be decoded; never another clip."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} clips")
        x = self._decoded(index % n)
        if x is None:
            return Skipped(display_name(self.samples[index % n][0]), "cannot decode it")
        return x, self._labels[index % n]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Clip `index`; a file that fails to decode warns once (VideoDecodeWarning) and the next clip is returned
        (training loaders need an item)."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} clips")
        for k in range(n):
            j = (index + k) % n
            x = self._decoded(j)
            if x is None:
                continue
            if self.hflip and torch.rand(()) < self.hflip:
                x = x.flip(-1)
            return x, self._labels[j]
        raise DataError(f"no clip of {display_name(str(self.root))} ({self.split}) can be decoded: check the files")
