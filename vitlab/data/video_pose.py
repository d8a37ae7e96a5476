"""`moving-fashion-mnist-pose`: the `moving-fashion-mnist-cls` clips with exact "pose" keypoints per item and frame.

Each of the K = 2 items carries J = 5 keypoints in every frame, read off its rendered silhouette (the item's pixels
> 0 at its corner in the canvas): its top-most, bottom-most, left-most and right-most silhouette pixels (ties broken
by the smallest other coordinate) and the silhouette's centroid. A silhouette only moves with its corner, so the
offsets are computed once per item image and added to the corner track `MovingFashionMNIST.trajectory(i)`; the
keypoints are exact by construction (`tests/models/test_video_paab.py` checks them against each item rendered alone).
Keypoints are the item's own, also where the other item covers it (the pose of an occluded joint is still known).

Items are (clip (1, T, H, W), label, keypoints (T, K * J, 2)); keypoints are (x, y) in [0, 1] of the frame's width
and height, pixel (c, r) of the 64x64 canvas sitting at ((c + 0.5) / 64, (r + 0.5) / 64), so they do not depend on
the size the frames are resized to. Joint k * J + j is item k's joint j (`JOINTS`). Clips and labels are exactly
`moving-fashion-mnist-cls`'s, so a model trained with `--recipe paat` on that set (keypoints recomputed from the
trajectories by `clip_keypoints`) sees the same data.
"""
import torch

from .video import CANVAS, OBJECTS, MovingFashionMNIST

__all__ = ["JOINTS", "MovingFashionMNISTPose", "clip_keypoints", "silhouette_keypoints", "patch_mask"]

JOINTS = ("top", "bottom", "left", "right", "centroid")


def silhouette_keypoints(image: torch.Tensor) -> torch.Tensor:
    """Keypoints (J, 2) as (column, row) pixel coordinates inside one (h, w) image of its silhouette (pixels > 0).

    The four extreme points are pixel indices (ties broken by the smallest other coordinate); the centroid is the
    mean (column, row) of the silhouette's pixels.
    """
    rows, cols = torch.nonzero(image > 0, as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("an item image has no pixel > 0: its silhouette, and so its keypoints, are undefined")
    points = torch.stack([cols, rows], dim=1).double()  # (P, 2) as (x, y)
    key_y = rows * image.shape[1] + cols  # row-major order: the first pixel of the top-most row is its left-most
    key_x = cols * image.shape[0] + rows  # column-major: the first pixel of the left-most column is its top-most
    extremes = [key_y.argmin(), key_y.argmax(), key_x.argmin(), key_x.argmax()]
    return torch.cat([points[torch.stack(extremes)], points.mean(dim=0, keepdim=True)])  # (J, 2)


def clip_keypoints(dataset: MovingFashionMNIST, index: int) -> torch.Tensor:
    """Keypoints (T, K * J, 2) in [0, 1] of clip `index` of a moving set: silhouette offsets + corner track."""
    picks, corners = dataset.trajectory(index)  # (K,), (T, K, 2)
    offsets = torch.stack([silhouette_keypoints(dataset.images[p, 0]) for p in picks])  # (K, J, 2) pixels
    pixels = corners[:, :, None, :].double() + offsets[None]  # (T, K, J, 2)
    return ((pixels + 0.5) / CANVAS).float().flatten(1, 2)  # (T, K * J, 2)


def patch_mask(keypoints: torch.Tensor, grid: tuple[int, int, int], tubelet: int = 1) -> torch.Tensor:
    """Which tubelet tokens hold a keypoint: (B, T', H' * W') bool, tokens row-major in (H', W') as PatchEmbed
    flattens them, from keypoints (B, T, J, 2) in [0, 1]; tubelet-frame t' covers frames t' * tubelet ... + tubelet - 1.

    PAAB's keypoint mask (PoseAwareVT `datasets/pose_utils.py` keypoints_2_patch_idx: 1 where a patch contains a
    keypoint); keypoints outside the frame are ignored, as there.
    """
    T2, H2, W2 = grid
    B, T, J, _ = keypoints.shape
    if T != T2 * tubelet:
        raise ValueError(f"keypoints for {T} frames do not fit {T2} tubelet-frames of {tubelet} frames")
    col = (keypoints[..., 0] * W2).floor().long()  # (B, T, J)
    row = (keypoints[..., 1] * H2).floor().long()
    inside = (col >= 0) & (col < W2) & (row >= 0) & (row < H2)
    frame = (torch.arange(T, device=keypoints.device) // tubelet)[None, :, None].expand(B, T, J)
    batch = torch.arange(B, device=keypoints.device)[:, None, None]
    flat = ((batch * T2 + frame) * H2 + row) * W2 + col  # (B, T, J) index into B T' H' W'
    mask = torch.zeros(B * T2 * H2 * W2, dtype=torch.bool, device=keypoints.device)
    mask[flat[inside]] = True
    return mask.reshape(B, T2, H2 * W2)


class MovingFashionMNISTPose(MovingFashionMNIST):
    """`moving-fashion-mnist-cls` clips with their items' keypoints: items (clip, label, keypoints (T, K * J, 2))."""

    num_joints = OBJECTS * len(JOINTS)

    def __init__(self, split: str = "test", **kwargs):
        super().__init__("classify", split, **kwargs)
        self.spec = type(self.spec)("moving-fashion-mnist-pose", options=self.spec.options)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        clip, label = super().__getitem__(index)
        return clip, label, clip_keypoints(self, index)
