"""Event-camera clips from moving Fashion-MNIST, `moving-fashion-mnist-events[:clips=N,frames=T,threshold=C]`.

An event camera's pixel fires when its log intensity has changed by the contrast threshold C since it last fired,
with the sign of the change as the event's polarity (Gallego et al., "Event-based Vision: A Survey", TPAMI 2020,
eq. 1-2: e = (x, y, t, p) whenever |log I(t) - log I(t - dt)| >= C). Here the camera sees the `-cls` clips (same
clips, same 6 motion labels, video.py) and is read out once per frame: between consecutive frames t-1 and t every
pixel fires n = floor(|dL| / C) events, dL = log(I_t + eps) - log(I_{t-1} + eps) with I in [0, 1], positive ones
when dL > 0 and negative ones when dL < 0. Item i is (2, T, H, W): channel 0 the count of positive events per frame,
channel 1 the count of negative events (the 2-channel "on / off spike" count frames of DVS Gesture loaders), from
T + 1 rendered frames. Static content fires nothing; a moving item fires along its leading and trailing edges.
Counts are computed on the native 64x64 canvas and resized per frame (bilinear, antialias: an area average) to the
model's size, then normalised with the model's mean / std (vl_eventtransact_* use mean 0, so "no event" stays 0).

Training augmentation (`train_aug`) is EventTransAct's event drop (`event_augment`), read from the official loaders,
github.com/tristandb8/EventTransAct @ 0264d26f92c86825b8c8b10a7c7a086fa6554b85, DL/dvs_gesture.py `eventDropAug`
(count frames) and DL/dl_ft_1_train_O_ECL.py `augmentation`.
"""
import os

import torch
import torch.nn.functional as F

from .fashion_mnist import FMNIST_DIR
from .spec import DataError, DataSpec, VisionDataset, check_aug, to_size, to_stats
from .video import CANVAS, CLS_CLASSES, MovingFashionMNIST, render

__all__ = ["MovingFashionMNISTEvents", "EVENT_AUGS", "EVENTS_DEFAULTS", "LOG_EPS", "event_augment",
           "events_from_frames"]

LOG_EPS = 0.1            # log(I + eps): a dark pixel (I = 0) is not infinitely sensitive (v2e's lin-log idea)
EVENTS_DEFAULTS = {"clips": 10000, "frames": 10, "threshold": 0.2}   # C = 0.2: v2e's default contrast threshold
EVENT_AUGS = ("val", "rand", "time", "rect", "pol")   # the official loader's eventAugs=['all']
MAX_TIME_RATIO = 0.35    # dvs_gesture.py `maxTR`: "time" erases up to 35 % of the pixels by the last frame


def events_from_frames(frames: torch.Tensor, threshold: float = 0.2, eps: float = LOG_EPS) -> torch.Tensor:
    """Polarity event counts (2, T, H, W) of frames (T + 1, H, W) with intensities in [0, 1].

    Channel 0: floor(dL / C) where dL > 0, channel 1: floor(-dL / C) where dL < 0, dL = log(I_t + eps) -
    log(I_{t-1} + eps) for t = 1..T (module docstring).
    """
    if frames.dim() != 3 or frames.shape[0] < 2:
        raise DataError(f"events need frames (T + 1, H, W) with T >= 1, got {tuple(frames.shape)}")
    if not threshold > 0:
        raise DataError(f"threshold={threshold!r} must be > 0 (a log-intensity contrast, e.g. threshold=0.2)")
    change = torch.diff(torch.log(frames.double() + eps), dim=0)  # (T, H, W) in float64: static pixels give 0
    count = torch.floor(change.abs() / threshold)
    return torch.stack([count * (change > 0), count * (change < 0)]).float()  # (2, T, H, W)


def event_augment(clip: torch.Tensor, generator: torch.Generator | None = None, augs=EVENT_AUGS,
                  p: float = 0.5) -> torch.Tensor:
    """EventTransAct's event drop on count frames (C, T, H, W) (0 = no event); returns a new tensor.

    With probability 1 - p the clip is returned unchanged (dvs_gesture.py: `if random() > 0.5: eventDropAug`).
    Otherwise ten uniforms r drawn once per clip pick what is erased in every frame:
    - val  (r1 > 0.8): counts below 1 (fractions left by resizing) are dropped;
    - rand (0.6 < r3): a random ratio in {0, .., 0.15} of the events is dropped by a fixed per-pixel mask; for
      r3 > 0.8 the mask and ratio are drawn afresh for every frame ("not the same for each channel / time": as
      dl_ft_1_train_O_ECL.py, whose `if` also erases then; dvs_gesture.py's `elif` drops nothing in that case);
    - time (0.4 < r3 < 0.6): a share of the pixels that grows by 0.35 / T per frame is dropped (r8 > 0.5), or one
      that shrinks from 0.35 (reverse order);
    - rect (r4 > 0.75, r5 > 0.75): up to two rectangles of H/6..H/5 x W/6..W/5 pixels are dropped;
    - pol  (r6 > 0.75): all positive (r7 > 0.5) or all negative events are dropped.
    """
    unknown = sorted(set(augs) - set(EVENT_AUGS))
    if unknown:
        raise DataError(f"unknown event augmentation(s) {unknown}: use some of {', '.join(EVENT_AUGS)}")
    if torch.rand((), generator=generator) >= p:
        return clip.clone()
    C, T, H, W = clip.shape
    r = torch.rand(10, generator=generator).tolist()
    hide = torch.rand(C, 1, H, W, generator=generator)             # the clip's per-pixel mask (eventHide)
    ratio = torch.randint(0, 16, (), generator=generator) / 100.0   # ratioHide
    corner = torch.stack([torch.randint(0, H, (2,), generator=generator),
                          torch.randint(0, W, (2,), generator=generator)])  # (2: y/x, 2 rectangles)
    sides = torch.stack([torch.randint(H // 6, max(H // 5, H // 6 + 1), (2,), generator=generator),
                         torch.randint(W // 6, max(W // 5, W // 6 + 1), (2,), generator=generator)])  # (2: h/w, 2)
    out = clip.clone()
    if "val" in augs and r[1] > 0.8:
        out[out < 1] = 0
    if "rand" in augs and r[3] > 0.6:
        if r[3] > 0.8:   # a fresh mask and ratio for every frame
            hide = torch.rand(C, T, H, W, generator=generator)
            ratio = torch.randint(0, 16, (1, T, 1, 1), generator=generator) / 100.0
        out[(hide < ratio).expand_as(out)] = 0
    if "time" in augs and 0.4 < r[3] < 0.6:
        time_ratio = MAX_TIME_RATIO * torch.arange(1, T + 1).view(1, T, 1, 1) / T  # timeRatio after frame t's +=
        drop = hide < time_ratio if r[8] > 0.5 else hide > (1 - MAX_TIME_RATIO) + time_ratio
        out[drop.expand_as(out)] = 0
    if "rect" in augs:
        for k, u in enumerate((r[4], r[5])):
            if u > 0.75:
                y, x, h, w = int(corner[0, k]), int(corner[1, k]), int(sides[0, k]), int(sides[1, k])
                out[:, :, y:y + h, x:x + w] = 0
    if "pol" in augs and r[6] > 0.75:
        out[0 if r[7] > 0.5 else 1] = 0
    return out


class MovingFashionMNISTEvents(VisionDataset):
    """`moving-fashion-mnist-events`: the `-cls` clips seen by an event camera, items ((2, T, H, W), label).

    `frames=T` event frames come from T + 1 rendered frames of the same motion; `threshold` is the contrast C.
    """

    def __init__(
            self,
            split: str = "test",
            *,
            img_size: int | tuple[int, int] = CANVAS,
            in_chans: int = 2,
            mean=(0.0,),
            std=(1.0,),
            train_aug: bool = False,
            aug: dict | None = None,
            data_dir: str | os.PathLike | None = None,
            seed: int = 0,
            clips: int = 10000,
            frames: int = 10,
            threshold: float = 0.2,
    ):
        kind = "moving-fashion-mnist-events"
        size = to_size(img_size)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise DataError(f"{kind}:frames={frames!r} must be an int >= 2 (motion needs two frames), e.g. frames=10")
        if in_chans != 2:
            raise DataError(f"{kind} clips have 2 channels (positive and negative event counts) but the model "
                            f"expects {in_chans}: create the model with in_chans=2 (e.g. vl_eventtransact_mfmnist)")
        if not (isinstance(threshold, (int, float)) and threshold > 0):
            raise DataError(f"{kind}:threshold={threshold!r} must be > 0 (a log-intensity contrast, e.g. 0.2)")
        self._mean, self._std = (torch.tensor(v).view(2, 1, 1, 1) for v in to_stats(mean, std, 2))
        check_aug(aug, {"hflip": 0.0, "re_prob": 0.0, "crop_padding": None}, kind)  # the engine's flags: ignored
        given = {"clips": clips, "frames": frames, "threshold": threshold}
        options = tuple((k, str(v)) for k, v in given.items() if v != EVENTS_DEFAULTS[k])
        self.spec, self.split, self.threshold = DataSpec(kind, options=options), split, float(threshold)
        self.classes = list(CLS_CLASSES)
        self.input_size, self.num_frames, self.train_aug = (2, *size), frames, train_aug
        # the same clips as moving-fashion-mnist-cls, rendered one frame longer: T + 1 frames give T event frames
        self.source = MovingFashionMNIST("classify", split, data_dir=data_dir or FMNIST_DIR, seed=seed,
                                         clips=clips, frames=frames + 1)
        self._labels = self.source._labels

    def __len__(self) -> int:
        return len(self._labels)

    def trajectory(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item rows, corners (T + 1, K, 2)) of clip `index`: see MovingFashionMNIST.trajectory."""
        return self.source.trajectory(index)

    def events(self, index: int) -> torch.Tensor:
        """Event counts (2, T, H, W) of clip `index` at the output size, before augmentation and normalisation."""
        picks, corners = self.trajectory(index)
        frames = render(self.source.images[picks, 0], corners).float() / 255.0  # (T + 1, 64, 64) in [0, 1]
        counts = events_from_frames(frames, self.threshold)  # (2, T, 64, 64)
        if self.input_size[1:] != (CANVAS, CANVAS):
            counts = F.interpolate(counts, size=self.input_size[1:], mode="bilinear", align_corners=False,
                                   antialias=min(self.input_size[1:]) < CANVAS).clamp_(min=0)
        return counts

    def view(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One training view of clip `index`: `event_augment`ed counts, normalised (2, T, H, W)."""
        return (event_augment(self.events(index), generator) - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.train_aug:
            return self.view(index), self._labels[index]
        return (self.events(index) - self._mean) / self._std, self._labels[index]
