"""Moving Fashion-MNIST clips, generated on the fly from the Fashion-MNIST idx files; clips are (C=1, T, H, W).

`moving-fashion-mnist` follows the Moving MNIST protocol (Srivastava et al., 2015, "Unsupervised Learning of Video
Representations using LSTMs"): two 28x28 items bounce inside a 64x64 canvas, overlaps are combined by pixel-wise
max, and an item is `frames` input frames plus `frames` target frames (10 + 10 by default) for prediction.

`moving-fashion-mnist-cls` is built the same way for classification, with 6 motion classes (axis of motion
{horizontal, vertical, diagonal} x speed {2, 5} px/frame) that no single frame can tell apart, by construction:
a position is `fold(u)` of an "unfolded" coordinate u on a circle of length 2R (R = 64 - 28, the room to move),
and a bounce is u running past R. u starts uniform on the integers of [0, 2R); u + t*v mod 2R is then uniform for
every integer velocity v and frame t, so every frame's positions (and images) have the same law in every class.
The direction's sign is random and not a class: fold(u + t*v) = fold(2R - u - t*v), so a clip moving right from u
is exactly a clip moving left from 2R - u, and no model could tell them apart.

`moving-fashion-mnist-cls:interaction=1` asks instead whether the two items, which meet head-on, pass through each
other ("pass-through") or bounce off each other ("bounce"). Per clip a motion of CLS_VELOCITIES (random axis, speed
and signs; not a class) carries item 1 from a meeting point m at frame t_m in {1, ..., T - 2}, and the mirror
motion carries item 2: u1(t) = m + (t - t_m) w, u2(t) = m - (t - t_m) w. The tracks fold(u1), fold(u2) coincide
exactly when (t - t_m) w = 0 mod R on a moving coordinate (m is never a multiple of R there, so the items never
meet at a wall; at most one meeting per R / |w| >= 7.2 frames). Items are points at their corners, as Moving MNIST
treats them (same-sized items overlap fully at the meeting): passing through, each item keeps its track; bouncing
(an elastic head-on collision of equal masses exchanges velocities) the items exchange tracks at every meeting. So
a bouncing clip's frame t is the passing clip's frame t with the two images exchanged after an odd number of
meetings: the images being independent and exchangeable, every single frame has the same law in both classes.
Clips 2k and 2k + 1 are a minimal pair: the same images and tracks, one passing and one bouncing, equal frame for
frame up to the first meeting.

Splits draw items from disjoint images: `train` and `val` from Fashion-MNIST's train file split as `fashion-mnist`
splits it (the fixed 5,000-image hold-out is val), `test` from the t10k file. `clips=N` sets the train split's size
(val N // 10, test N // 5; default 10000); `frames=T` the clip length. Item i of a split is drawn from
`torch.Generator().manual_seed(seed * 1_000_003 + split offset + i)`, so a clip is the same in every process.
"""
import os

import torch
import torch.nn.functional as F

from .fashion_mnist import FMNIST_DIR, FMNIST_MEAN, FMNIST_STD, VAL_SIZE, load_split
from .spec import DataError, DataSpec, VisionDataset, check_aug, holdout, to_size, to_stats

__all__ = ["MovingFashionMNIST", "CANVAS", "ITEM", "ROOM", "CLS_CLASSES", "CLS_VELOCITIES", "INTERACTION_CLASSES",
           "fold", "render", "class_from_trajectory", "meeting_tracks"]

CANVAS = 64                 # canvas side, pixels
ITEM = 28                   # Fashion-MNIST item side, pixels
ROOM = CANVAS - ITEM        # top-left corners lie in [0, ROOM]
OBJECTS = 2
PRED_SPEED = (2.0, 5.0)     # moving-fashion-mnist: speed uniform in this range (px/frame), direction uniform
CLS_SPEEDS = {"slow": 2, "fast": 5}
CLS_AXES = {"horizontal": (1, 0), "vertical": (0, 1), "diagonal": (1, 1)}  # (x, y) components of the motion
CLS_CLASSES = [f"{axis}-{speed}" for axis in CLS_AXES for speed in CLS_SPEEDS]
CLS_VELOCITIES = [(ax * s, ay * s) for (ax, ay) in CLS_AXES.values() for s in CLS_SPEEDS.values()]  # (|vx|, |vy|)
INTERACTION_CLASSES = ["pass-through", "bounce"]   # moving-fashion-mnist-cls:interaction=1
_SPLIT_OFFSET = {"train": 0, "val": 1_431_655_765, "test": 2 * 1_431_655_765}


def fold(u: torch.Tensor, room: int = ROOM) -> torch.Tensor:
    """Position in [0, room] of the unfolded coordinate u: a point bouncing between 0 and room (period 2 * room)."""
    return room - (torch.remainder(u, 2 * room) - room).abs()


def render(images: torch.Tensor, positions: torch.Tensor, canvas: int = CANVAS) -> torch.Tensor:
    """Frames (T, canvas, canvas) uint8: each of the K items pasted at its (x, y) top-left corner, overlaps by max.

    Args:
        images: (K, h, w) uint8 items.
        positions: (T, K, 2) integer (x, y) corners, each in [0, canvas - side].
    """
    T, K, _ = positions.shape
    h, w = images.shape[-2:]
    frames = torch.zeros(T, canvas, canvas, dtype=torch.uint8)
    for t in range(T):
        for k in range(K):
            x, y = int(positions[t, k, 0]), int(positions[t, k, 1])
            window = frames[t, y:y + h, x:x + w]
            torch.maximum(window, images[k], out=window)
    return frames


def class_from_trajectory(positions: torch.Tensor) -> int:
    """The moving-fashion-mnist-cls class of corner tracks (T, K, 2): which axes move, and the largest step's size."""
    steps = positions.diff(dim=0).abs().amax(dim=(0, 1))  # (2,) largest |step| along x and y over frames and items
    speed = int(steps.max())
    axis = (int(steps[0] > 0), int(steps[1] > 0))
    return CLS_VELOCITIES.index((axis[0] * speed, axis[1] * speed))


def meeting_tracks(meet: torch.Tensor, velocity: torch.Tensor, t_meet: int, frames: int, bounce: bool
                   ) -> torch.Tensor:
    """Corners (T, 2, 2) of two items meeting head-on at unfolded point `meet` (2,) at frame `t_meet`, moving with
    `velocity` (2,) and its mirror; with `bounce` they exchange tracks at every meeting (module docstring).

    Meetings are where d(t) = (t - t_meet) * w crosses a multiple of R (w: a moving coordinate's velocity); the
    items have exchanged tracks at frame t when floor(d(t) / R) - floor(d(0) / R) is odd (at a meeting frame the two
    tracks coincide, so which side of it counts does not show)."""
    t = torch.arange(frames)[:, None]                                             # (T, 1)
    tracks = torch.stack([fold(meet + (t - t_meet) * velocity), fold(meet - (t - t_meet) * velocity)], dim=1)
    if not bounce:
        return tracks                                                             # (T, 2, 2): item k on track k
    w = int(velocity[velocity.nonzero()[0, 0]])                                   # a moving coordinate's velocity
    d = (t[:, 0] - t_meet) * w                                                    # (T,)
    crossed = torch.div(d, ROOM, rounding_mode="floor") - torch.div(d[0], ROOM, rounding_mode="floor")
    swapped = crossed.remainder(2).bool()                                         # (T,)
    return torch.where(swapped[:, None, None], tracks.flip(1), tracks)


class MovingFashionMNIST(VisionDataset):
    """Moving Fashion-MNIST clips; `task` "predict" (items (input, target)) or "classify" (items (clip, label)).

    Inputs are normalized float clips (1, T, H, W) (x / 255 - mean) / std, resized per frame from 64x64 (bilinear,
    antialias) when img_size differs; prediction targets are (1, T, H, W) pixels in [0, 1] at the same size.
    Augmentation is none: a flip or crop would change the motion the labels describe (train_aug is accepted so that
    the training engine can ask for it). `interaction` (classify only): the pass-through / bounce classes.
    """

    def __init__(
            self,
            task: str = "classify",
            split: str = "test",
            *,
            img_size: int | tuple[int, int] = CANVAS,
            in_chans: int = 1,
            mean=FMNIST_MEAN,
            std=FMNIST_STD,
            train_aug: bool = False,
            aug: dict | None = None,
            data_dir: str | os.PathLike | None = None,
            seed: int = 0,
            clips: int = 10000,
            frames: int = 10,
            interaction: bool = False,
    ):
        if task not in ("predict", "classify"):
            raise DataError(f"task={task!r} must be 'predict' or 'classify'")
        kind = "moving-fashion-mnist" if task == "predict" else "moving-fashion-mnist-cls"
        size = to_size(img_size)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise DataError(f"{kind}:frames={frames!r} must be an int >= 2 (motion needs two frames), e.g. frames=10")
        if interaction and (task != "classify" or frames < 3):
            raise DataError(f"{kind}:interaction=1 needs the classification set and frames >= 3 (the items meet "
                            f"inside the clip, with a frame before and after), got {kind}:frames={frames}")
        if in_chans != 1:
            raise DataError(f"{kind} clips are grayscale (1 channel) but the model expects {in_chans}: "
                            f"create the model with in_chans=1")
        (mean,), (std,) = to_stats(mean, std, 1)
        check_aug(aug, {"hflip": 0.0, "re_prob": 0.0, "crop_padding": None}, kind)
        given = (("clips", clips), ("frames", frames), ("interaction", interaction))
        options = tuple((k, str(int(v))) for k, v in given if v != {"clips": 10000, "frames": 10, "interaction": 0}[k])
        self.spec, self.split, self.task = DataSpec(kind, options=options), split, task
        self.classes = [] if task == "predict" else list(INTERACTION_CLASSES if interaction else CLS_CLASSES)
        self.interaction = bool(interaction)
        self.input_size, self.num_frames, self.train_aug = (1, *size), frames, train_aug
        self.data_dir = str(data_dir or FMNIST_DIR)
        self.images, _ = load_split(self.data_dir, "test" if split == "test" else "train")
        if split == "test":
            rows = torch.arange(len(self.images))
        else:
            train_idx, val_idx = holdout(len(self.images), VAL_SIZE, 0)  # the fashion-mnist splits' images
            rows = train_idx if split == "train" else val_idx
        self.rows = rows  # this split's images: disjoint from the other splits'
        n = {"train": clips, "val": clips // 10, "test": clips // 5}[split]
        if n < 1:
            raise DataError(f"{kind}:clips={clips} leaves the {split} split empty: use clips >= 10")
        self._labels = [i % len(self.classes) for i in range(n)] if self.classes else [0] * n
        self._base = seed * 1_000_003 + _SPLIT_OFFSET[split]
        self._mean, self._std = mean, std

    def __len__(self) -> int:
        return len(self._labels)

    def trajectory(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item rows (K,) in the idx file, corners (T_total, K, 2) int64) of clip `index`; T_total = 2 * frames
        for prediction, frames for classification."""
        label = self._labels[index]  # raises IndexError past the end, as a Dataset must
        index = index % len(self._labels)
        if self.interaction:   # clips 2k and 2k + 1: the same draw, passing and bouncing
            g = torch.Generator().manual_seed(self._base + index - index % 2)
            picks = self.rows[torch.randint(len(self.rows), (OBJECTS,), generator=g)]
            v = torch.tensor(CLS_VELOCITIES[int(torch.randint(len(CLS_VELOCITIES), (), generator=g))])
            velocity = v * (torch.randint(2, (2,), generator=g) * 2 - 1)  # (2,) px/frame, random signs
            k = torch.randint(2 * ROOM - 2, (2,), generator=g)
            meet = torch.where(v != 0, k + 1 + (k >= ROOM - 1).long(),  # moving: never 0 or R (a wall)
                               torch.randint(2 * ROOM, (2,), generator=g))
            t_meet = int(torch.randint(1, self.num_frames - 1, (), generator=g))
            return picks, meeting_tracks(meet, velocity, t_meet, self.num_frames, bounce=label == 1)
        g = torch.Generator().manual_seed(self._base + index)
        picks = self.rows[torch.randint(len(self.rows), (OBJECTS,), generator=g)]
        t = torch.arange(2 * self.num_frames if self.task == "predict" else self.num_frames)[:, None, None]
        if self.task == "predict":
            start = torch.rand(OBJECTS, 2, generator=g) * 2 * ROOM
            angle = torch.rand(OBJECTS, generator=g) * 2 * torch.pi
            speed = PRED_SPEED[0] + torch.rand(OBJECTS, generator=g) * (PRED_SPEED[1] - PRED_SPEED[0])
            velocity = torch.stack([angle.cos(), angle.sin()], dim=1) * speed[:, None]  # (K, 2) px/frame
            corners = fold(start + t * velocity).round().long()  # (T, K, 2)
        else:
            start = torch.randint(2 * ROOM, (OBJECTS, 2), generator=g)  # uniform unfolded start: see module doc
            sign = torch.randint(2, (OBJECTS, 2), generator=g) * 2 - 1
            velocity = torch.tensor(CLS_VELOCITIES[label]) * sign  # (K, 2): the class's speeds, random signs
            corners = fold(start + t * velocity)  # (T, K, 2)
        return picks, corners

    def __getitem__(self, index: int) -> tuple[torch.Tensor, "torch.Tensor | int"]:
        picks, corners = self.trajectory(index)
        frames = render(self.images[picks, 0], corners).float()[:, None]  # (T_total, 1, 64, 64) in 0..255
        if self.input_size[1:] != (CANVAS, CANVAS):
            frames = F.interpolate(frames, size=self.input_size[1:], mode="bilinear", align_corners=False,
                                   antialias=min(self.input_size[1:]) < CANVAS).clamp_(0, 255)
        clip = frames.transpose(0, 1) / 255.0  # (1, T_total, H, W) in [0, 1]
        x = (clip[:, :self.num_frames] - self._mean) / self._std
        if self.task == "predict":
            return x, clip[:, self.num_frames:]
        return x, self._labels[index]
