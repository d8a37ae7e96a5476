"""moving-fashion-mnist[-cls]: specs, determinism, bounces inside the canvas, disjoint splits, and motion classes
that no single frame can tell apart (checked on the construction itself)."""
from collections import Counter

import pytest
import torch

from vitlab.data import DataError, DataSpec, build_dataset, dataset_info
from vitlab.data.video import (CLS_CLASSES, CLS_VELOCITIES, ROOM, MovingFashionMNIST, class_from_trajectory,
                               fold, render)


@pytest.fixture(scope="module")
def cls_train() -> MovingFashionMNIST:
    return build_dataset("moving-fashion-mnist-cls:clips=60", "train", img_size=64)


def test_spec_round_trip_and_errors():
    spec = DataSpec.parse("moving-fashion-mnist-cls:clips=20,frames=4")
    assert DataSpec.parse(str(spec)) == spec and spec.option("clips") == 20 and spec.option("frames") == 4
    assert DataSpec.parse("moving-fashion-mnist").option("frames") == 10
    with pytest.raises(DataError, match="unknown option 'speed'.*clips, frames"):
        DataSpec.parse("moving-fashion-mnist:speed=3")
    with pytest.raises(DataError, match="frames=1 must be an int >= 2"):
        build_dataset("moving-fashion-mnist-cls:frames=1", "test")
    assert dataset_info("moving-fashion-mnist-cls")["classes"] == CLS_CLASSES
    assert dataset_info("moving-fashion-mnist")["num_classes"] == 0  # prediction: `vitlab train` refuses it


def test_items_are_deterministic_per_seed_and_index(cls_train):
    x, y = cls_train[7]
    again = build_dataset("moving-fashion-mnist-cls:clips=60", "train", img_size=64)
    torch.testing.assert_close(again[7][0], x, rtol=0, atol=0)
    assert again[7][1] == y
    other = build_dataset("moving-fashion-mnist-cls:clips=60", "train", img_size=64, seed=1)
    assert not torch.equal(other[7][0], x)
    assert not torch.equal(cls_train[8][0], x)


def test_shapes_and_prediction_targets():
    pred = build_dataset("moving-fashion-mnist:clips=10,frames=3", "val", img_size=64)
    x, target = pred[0]
    assert x.shape == target.shape == (1, 3, 64, 64) and len(pred) == 1
    assert 0 <= float(target.min()) and float(target.max()) <= 1
    picks, corners = pred.trajectory(0)
    full = render(pred.images[picks, 0], corners).float() / 255  # (6, 64, 64): 3 input + 3 target frames
    torch.testing.assert_close(target[0], full[3:])
    torch.testing.assert_close(x[0], (full[:3] - 0.2860) / 0.3530)
    small = build_dataset("moving-fashion-mnist-cls:clips=10,frames=4", "test", img_size=32)
    assert small[1][0].shape == (1, 4, 32, 32) and isinstance(small[1][1], int)


def test_bounces_stay_in_frame(cls_train):
    pred = build_dataset("moving-fashion-mnist:clips=30", "train", img_size=64)
    for ds in (cls_train, pred):
        for i in range(len(ds)):
            picks, corners = ds.trajectory(i)
            assert int(corners.min()) >= 0 and int(corners.max()) <= ROOM
            steps = corners.diff(dim=0).abs()
            assert int(steps.max()) <= 5 + 1  # speed <= 5 px/frame (+1 for rounding), also across a bounce
            for k in range(2 if i < 5 else 0):  # one item alone: every frame shows all of its pixels
                alone = render(ds.images[picks[k:k + 1], 0], corners[:, k:k + 1])
                assert (alone.sum(dim=(1, 2)) == ds.images[picks[k], 0].sum()).all()


def test_fold_reflects_at_the_walls():
    u = torch.arange(-3, 4 * ROOM + 3)
    p = fold(u)
    assert p.min() == 0 and p.max() == ROOM
    assert (p.diff().abs() == 1).all()  # unit steps in u move the item one pixel, turning round at 0 and ROOM
    assert fold(torch.tensor([0, ROOM, 2 * ROOM, ROOM + 5])).tolist() == [0, ROOM, 0, ROOM - 5]


def test_no_single_frame_carries_the_class():
    """The law of a corner at frame t is the same for every class: fold(u0 + t * v) with u0 uniform on the 2R
    integers of the circle is a permutation of fold(u0), for every velocity. Images are drawn independently of the
    class, so the law of each whole frame is class-independent: no single-frame classifier beats chance."""
    u0 = torch.arange(2 * ROOM)
    law0 = Counter(fold(u0).tolist())
    for vx, vy in CLS_VELOCITIES:
        for v in (vx, vy, -vx, -vy):
            for t in range(10):
                assert Counter(fold(u0 + t * v).tolist()) == law0


def test_class_is_recovered_from_the_motion(cls_train):
    labels = []
    for i in range(len(cls_train)):
        _, corners = cls_train.trajectory(i)
        labels.append(int(cls_train.targets[i]))
        assert class_from_trajectory(corners) == labels[-1]
    assert sorted(Counter(labels).values()) == [10] * len(CLS_CLASSES)  # balanced
    assert cls_train[7][1] == labels[7]


def test_splits_draw_from_disjoint_images(cls_train):
    val = build_dataset("moving-fashion-mnist-cls:clips=60", "val", img_size=64)
    test = build_dataset("moving-fashion-mnist-cls:clips=60", "test", img_size=64)
    assert len(cls_train) == 60 and len(val) == 6 and len(test) == 12
    assert not set(cls_train.rows.tolist()) & set(val.rows.tolist())  # same file, disjoint rows
    assert test.images.shape[0] == 10000 and cls_train.images.shape[0] == 60000  # t10k vs train file
    for ds in (cls_train, val):
        rows = set(ds.rows.tolist())
        assert all(set(ds.trajectory(i)[0].tolist()) <= rows for i in range(len(ds)))


# --- moving-fashion-mnist-cls:interaction=1: pass-through vs bounce ---

@pytest.fixture(scope="module")
def interaction_train() -> MovingFashionMNIST:
    return MovingFashionMNIST("classify", "train", img_size=64, clips=40, interaction=True)


def _separation(corners: torch.Tensor, t: int) -> int:
    """Signed offset of item 0 from item 1 along the axis they move on (the first coordinate that changes)."""
    axis = int((corners[1:] != corners[:-1]).any(dim=(0, 1)).nonzero()[0, 0])
    return int(corners[t, 0, axis] - corners[t, 1, axis])


def test_interaction_spec_and_classes(interaction_train):
    spec = DataSpec.parse("moving-fashion-mnist-cls:clips=40,interaction=1")
    assert str(interaction_train.spec) == str(spec) and spec.option("interaction") == 1
    assert DataSpec.parse("moving-fashion-mnist-cls").option("interaction") == 0   # the motion classes by default
    assert interaction_train.classes == ["pass-through", "bounce"]
    assert sorted(Counter(interaction_train.targets.tolist()).values()) == [20, 20]
    with pytest.raises(DataError, match="interaction=2.*must be 0 or 1"):
        DataSpec.parse("moving-fashion-mnist-cls:interaction=2")
    with pytest.raises(DataError, match="unknown option 'interaction'"):
        DataSpec.parse("moving-fashion-mnist:interaction=1")            # prediction clips have no classes
    with pytest.raises(DataError, match="frames >= 3"):
        MovingFashionMNIST("classify", "test", clips=10, frames=2, interaction=True)


def test_interaction_label_follows_the_geometry(interaction_train):
    """In every clip the two items meet (their corners coincide at some frame t, strictly inside the clip). Passing
    through each other, their order along the axis of motion flips across the meeting; bouncing off each other,
    it does not (checked on the rendered geometry, not through the generator's own bookkeeping)."""
    labels = interaction_train.targets.tolist()
    for i in range(len(interaction_train)):
        picks, corners = interaction_train.trajectory(i)
        assert int(corners.min()) >= 0 and int(corners.max()) <= ROOM
        meets = (corners[:, 0] == corners[:, 1]).all(dim=-1).nonzero().flatten().tolist()
        assert meets and 0 < meets[0] < len(corners) - 1, i
        t = meets[0]
        before, after = _separation(corners, t - 1), _separation(corners, t + 1)
        assert before != 0 and after != 0
        passed = (before > 0) != (after > 0)
        assert labels[i] == (0 if passed else 1), i
        steps = corners.diff(dim=0).abs()
        assert int(steps.max()) <= 5                                   # a bounce never makes an item jump


def test_interaction_single_frames_cannot_decide(interaction_train):
    """Clips 2k (pass-through) and 2k + 1 (bounce) share their first frame (and every frame up to the meeting),
    and every bouncing frame is the passing frame with the two items' images exchanged: the images being drawn
    independently of each other, each single frame has the same law in both classes."""
    for k in range(6):
        (x_pass, y_pass), (x_bounce, y_bounce) = interaction_train[2 * k], interaction_train[2 * k + 1]
        assert (y_pass, y_bounce) == (0, 1)
        torch.testing.assert_close(x_pass[:, 0], x_bounce[:, 0], rtol=0, atol=0)
        picks, corners = interaction_train.trajectory(2 * k)
        picks_b, corners_b = interaction_train.trajectory(2 * k + 1)
        assert torch.equal(picks, picks_b)
        images = interaction_train.images[picks, 0]
        frames_b = render(images, corners_b)
        for t in range(len(corners)):
            same = torch.equal(frames_b[t], render(images, corners[t:t + 1])[0])
            exchanged = torch.equal(frames_b[t], render(images.flip(0), corners[t:t + 1])[0])
            assert same or exchanged, (k, t)
        assert not torch.equal(x_pass, x_bounce)                          # the motion after the meeting differs
