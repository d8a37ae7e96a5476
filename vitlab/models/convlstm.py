"""ConvLSTM (Shi et al., NeurIPS 2015, "Convolutional LSTM Network"): the recurrent baseline of spatio-temporal
prediction, on clips (B, C, T, H, W) -> the next T frames (B, C, T, H, W).

Each cell is eq. 3 of the paper without the peephole terms, as OpenSTL implements it
(chengtan9907/OpenSTL `openstl/modules/convlstm_modules.py`, commit 9da43f4bda7f, no layer norm as in its Moving
MNIST config): [i, f, g, o] = conv_x(x_t) + conv_h(h_{t-1}) (bias-free k x k convs), c_t = sigmoid(f) * c_{t-1} +
sigmoid(i) * tanh(g), h_t = sigmoid(o) * tanh(c_t). (OpenSTL's cell also builds `conv_o` and `conv_last`, which its
forward never uses; they are left out here.) As OpenSTL's `ConvLSTM_Model`, frames are folded into p x p patches
(space to depth) before the stack of cells and a bias-free 1x1 conv maps the top hidden state to the next frame.

Prediction is closed-loop, as OpenSTL's model once its scheduled sampling has reached zero teacher forcing: the
T input frames drive the recurrence, then each predicted frame is fed back for the next step, 2T - 1 steps in all;
the outputs of the last T steps are the prediction. Predictions are pixels in [0, 1] space while inputs are
normalized ((x - mean) / std, vitlab's video data), so a fed-back prediction is normalized by `mean` / `std` first.

With `num_classes > 0` the head is instead a classifier of the top hidden state after the last input frame,
averaged over positions (the recurrence then runs over the T input frames only).
"""
import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model

__all__ = ["ConvLSTM", "ConvLSTMCell"]


class ConvLSTMCell(nn.Module):
    """One ConvLSTM cell: (x_t, h, c) -> (h_t, c_t), gates from bias-free k x k convolutions of x_t and h."""

    def __init__(self, in_chans: int, hidden: int, kernel_size: int = 5):
        super().__init__()
        self.hidden = hidden
        self.conv_x = nn.Conv2d(in_chans, 4 * hidden, kernel_size, padding=kernel_size // 2, bias=False)
        self.conv_h = nn.Conv2d(hidden, 4 * hidden, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = (self.conv_x(x) + self.conv_h(h)).chunk(4, dim=1)  # each (B, hidden, H, W)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class ConvLSTM(nn.Module):
    """Stacked ConvLSTM cells over p x p patch-folded frames; predicts the next `num_frames` frames closed-loop
    (or classifies the clip, num_classes > 0)."""

    def __init__(
            self,
            img_size: int | tuple[int, int] = 64,
            num_frames: int = 10,
            patch_size: int = 4,
            in_chans: int = 1,
            num_classes: int = 0,
            hidden: tuple[int, ...] = (128, 128, 128, 128),
            kernel_size: int = 5,
            mean: float = 0.2860,
            std: float = 0.3530,
    ):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {patch_size}")
        self.num_frames, self.patch_size, self.in_chans, self.num_classes = num_frames, patch_size, in_chans, 0
        self.mean, self.std = mean, std
        self.num_features = self.head_hidden_size = hidden[-1]
        self.cells = nn.ModuleList(ConvLSTMCell(in_chans * patch_size ** 2 if i == 0 else hidden[i - 1], h,
                                                kernel_size) for i, h in enumerate(hidden))
        self.reset_classifier(num_classes)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """num_classes > 0: a classifier of the pooled last hidden state; 0: the bias-free 1x1 frame head."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else \
            nn.Conv2d(self.num_features, self.in_chans * self.patch_size ** 2, 1, bias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, C, T, H, W) -> the top cell's hidden states (B, T, hidden, H/p, W/p) of the T prediction steps
        (of the T input frames for a classifier)."""
        expected = (self.in_chans, self.num_frames, *self.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ConvLSTM expects clips (B, C, T, H, W) with (C, T, H, W) = {expected}, got "
                             f"{tuple(x.shape)}: build the model with num_frames/img_size/in_chans of the data")
        B, C, T = x.shape[:3]
        frames = nn.functional.pixel_unshuffle(x.transpose(1, 2).flatten(0, 1), self.patch_size)  # (B*T, Cp², h, w)
        frames = frames.unflatten(0, (B, T))  # (B, T, C p², h, w)
        h = [frames.new_zeros(B, cell.hidden, *frames.shape[-2:]) for cell in self.cells]
        c = [z.clone() for z in h]
        states, net = [], frames[:, 0]
        for t in range(T if self.num_classes else 2 * T - 1):
            if 0 < t < T:
                net = frames[:, t]
            elif t >= T:  # feed the last prediction back, normalized as the inputs are
                net = (self.head(states[-1]) - self.mean) / self.std
            for k, cell in enumerate(self.cells):
                h[k], c[k] = cell(net if k == 0 else h[k - 1], h[k], c[k])
            if t >= T - 1 or self.num_classes:
                states.append(h[-1])
        return torch.stack(states, dim=1)  # (B, T, hidden, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Hidden states (B, T, hidden, h, w) -> frames (B, C, T, H, W) (pre_logits: the states themselves), or
        for a classifier the logits of the last state averaged over positions (pre_logits: that average)."""
        if self.num_classes:
            x = x[:, -1].mean(dim=(-2, -1))  # (B, hidden)
            return x if pre_logits else self.head(x)
        if pre_logits:
            return x
        B, T = x.shape[:2]
        frames = nn.functional.pixel_shuffle(self.head(x.flatten(0, 1)), self.patch_size)  # (B*T, C, H, W)
        return frames.unflatten(0, (B, T)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(input_size: tuple[int, int, int], **kwargs) -> dict:
    """timm's pretrained config; input_size is one frame's (C, H, W): the frame count is the model's num_frames."""
    return {"url": "", "num_classes": 0, "input_size": input_size, "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.2860,), "std": (0.3530,), "first_conv": "cells.0.conv_x",
            "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "vl_convlstm_mmnist.untrained": _cfg((1, 64, 64)),
    "vl_convlstm_mmnist_small.untrained": _cfg((1, 64, 64)),
    "vl_test_convlstm.untrained": _cfg((1, 32, 32)),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> ConvLSTM:
    model = build_vitlab_model(ConvLSTM, variant, pretrained, **kwargs)
    # the frame size it was built for (img_size / in_chans kwargs), which runners and checkpoints read from here
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (model.in_chans, *model.img_size)}
    return model


@register_model
def vl_convlstm_mmnist(pretrained: bool = False, **kwargs) -> ConvLSTM:
    """ConvLSTM of OpenSTL's Moving MNIST config (configs/mmnist/ConvLSTM.py): 4 layers x 128, 5x5, patch 4."""
    arch = dict(img_size=64, num_frames=10, patch_size=4, hidden=(128, 128, 128, 128), kernel_size=5)
    return _create("vl_convlstm_mmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_convlstm_mmnist_small(pretrained: bool = False, **kwargs) -> ConvLSTM:
    """A CPU-sized ConvLSTM with about vl_predformer_mmnist_small's parameters: 2 layers x 22, 5x5, patch 4."""
    arch = dict(img_size=64, num_frames=10, patch_size=4, hidden=(22, 22), kernel_size=5)
    return _create("vl_convlstm_mmnist_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_convlstm(pretrained: bool = False, **kwargs) -> ConvLSTM:
    """Tiny ConvLSTM for tests: clips (1, 4, 32, 32) -> 4 frames, 2 layers x 8, 3x3, patch 4."""
    arch = dict(img_size=32, num_frames=4, patch_size=4, hidden=(8, 8), kernel_size=3)
    return _create("vl_test_convlstm", pretrained, **dict(arch, **kwargs))
