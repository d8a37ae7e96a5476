"""fmnist-scenes and coco:PATH: determinism, disjoint splits, labels consistent with an independent re-render
(occlusion, masks, boxes, semantic and panoptic maps), the data specs, a tiny COCO set read back with pycocotools."""
import json

import numpy as np
import pytest
import torch

from vitlab.data import DataError, DataSpec, build_dataset, build_dense_dataset, dataset_info
from vitlab.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
from vitlab.data.scenes import (BACKGROUND, CLASS_NAMES, MASK_THRESHOLD, MIN_VISIBLE, NUM_CLASSES, CocoScenes,
                                FmnistScenes, collate_scenes)


@pytest.fixture(scope="module")
def train() -> FmnistScenes:
    return FmnistScenes("train", n=40)


def _naive_layers(ds: FmnistScenes, index: int) -> tuple[list[np.ndarray], list[int]]:
    """Each item's full silhouette on the canvas (S, S) bool and its class, re-rendered from the layout by hand."""
    picks, sides, corners = ds.layout(index)
    silhouettes = []
    for row, side, (y, x) in zip(picks.tolist(), sides.tolist(), corners.tolist()):
        item = ds.images[row].float()[None]
        if side != 28:
            item = torch.nn.functional.interpolate(item, size=(side, side), mode="bilinear", align_corners=False,
                                                   antialias=side < 28)
        full = np.zeros((ds.size, ds.size), bool)
        full[y:y + side, x:x + side] = item[0, 0].numpy() > MASK_THRESHOLD
        silhouettes.append(full)
    return silhouettes, ds.item_labels[picks].tolist()


def test_labels_match_an_independent_render(train):
    for k in range(len(train)):
        image, target = train[k]
        silhouettes, classes = _naive_layers(train, k)
        visible = [s & ~np.any(silhouettes[j + 1:], axis=0) if j + 1 < len(silhouettes) else s
                   for j, s in enumerate(silhouettes)]  # later items cover earlier ones
        kept = [j for j, v in enumerate(visible) if v.sum() >= MIN_VISIBLE]
        masks = target["masks"].numpy()
        assert masks.shape == (len(kept), 64, 64) and masks.dtype == bool
        np.testing.assert_array_equal(masks, np.array([visible[j] for j in kept]).reshape(-1, 64, 64))
        assert target["labels"].tolist() == [classes[j] for j in kept]
        assert masks.sum(0).max(initial=0) <= 1  # disjoint
        semantic, panoptic = target["semantic"].numpy(), target["panoptic"].numpy()
        expected = np.full((64, 64), BACKGROUND)
        for i, j in enumerate(kept):
            expected[masks[i]] = classes[j]
            ys, xs = np.nonzero(masks[i])
            assert target["boxes"][i].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert (panoptic[masks[i], 1] == i + 1).all()
        np.testing.assert_array_equal(semantic, expected)
        np.testing.assert_array_equal(panoptic[..., 0], semantic)
        assert (panoptic[~masks.any(0), 1] == 0).all() and (panoptic[semantic == BACKGROUND] == [BACKGROUND, 0]).all()
        # the image: pasted silhouettes only, so nothing outside every silhouette is bright
        pixels = image[0].numpy() * FMNIST_STD[0] + FMNIST_MEAN[0]
        np.testing.assert_allclose(pixels[~np.any(silhouettes, axis=0)], 0.0, atol=1e-6)
        assert (pixels[masks.any(0)] > MASK_THRESHOLD / 255 - 1e-6).all()
        assert image.shape == (1, 64, 64) and image.dtype == torch.float32
        assert target["labels"].dtype == target["semantic"].dtype == torch.int64
        assert target["boxes"].dtype == torch.float32 and target["panoptic"].shape == (64, 64, 2)


def test_layout_statistics(train):
    counts, sides = [], []
    for k in range(len(train)):
        picks, side, corners = train.layout(k)
        counts.append(len(picks))
        sides += side.tolist()
        assert ((corners >= 0) & (corners + side[:, None] <= 64)).all()
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) > 3
    assert 17 <= min(sides) and max(sides) <= 39 and max(sides) - min(sides) > 10  # 28 * [0.6, 1.4]


def test_canvases_are_deterministic_and_seeded(train):
    image, target = train[7]
    again = FmnistScenes("train", n=40)[7]
    torch.testing.assert_close(again[0], image, rtol=0, atol=0)
    assert all(torch.equal(again[1][key], target[key]) for key in target)
    assert not torch.equal(FmnistScenes("train", n=40, seed=1)[7][0], image)
    assert not torch.equal(train[8][0], image)
    assert torch.equal(FmnistScenes("train", n=1000)[7][0], image)  # n does not change canvas k
    torch.manual_seed(123), np.random.seed(5)  # no global RNG is read
    reversed_order = [FmnistScenes("train", n=40)[k][0] for k in (9, 8, 7)]
    assert torch.equal(reversed_order[2], image)
    worker = torch.utils.data.DataLoader(train, batch_size=1, sampler=[7], num_workers=1, collate_fn=collate_scenes)
    worker_images, worker_targets = next(iter(worker))  # rendered in another process
    assert torch.equal(worker_images[0], image) and torch.equal(worker_targets[0]["panoptic"], target["panoptic"])


def test_splits_draw_disjoint_items():
    splits = {s: FmnistScenes(s, n=30) for s in ("train", "val", "test")}
    assert not set(splits["train"].rows.tolist()) & set(splits["val"].rows.tolist())
    assert len(splits["train"].rows) == 55000 and len(splits["val"].rows) == 5000 and len(splits["test"].rows) == 10000
    assert not torch.equal(splits["train"].images, splits["test"].images)  # test reads the t10k file
    for name, ds in splits.items():
        allowed = set(ds.rows.tolist())
        assert all(set(ds.layout(k)[0].tolist()) <= allowed for k in range(len(ds)))
    assert not torch.equal(splits["train"][0][0], splits["val"][0][0])


def test_specs_and_builders():
    spec = DataSpec.parse("fmnist-scenes:n=200,size=48,items=3")
    assert DataSpec.parse(str(spec)) == spec and spec.option("size") == 48 and spec.option("n") == 200
    assert DataSpec.parse("fmnist-scenes").option("n") == 20000 and DataSpec.parse("synthetic").option("n") == 256
    sizes = {s: len(build_dense_dataset(spec, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 200, "val": 10, "test": 20}
    ds = build_dense_dataset(spec, "val")
    image, target = ds[3]
    assert image.shape == (1, 48, 48) and target["semantic"].shape == (48, 48) and len(ds.layout(3)[0]) <= 3
    info = dataset_info("fmnist-scenes:size=48")
    assert info["classes"] == list(CLASS_NAMES) and info["num_classes"] == NUM_CLASSES == 11
    assert info["native_shape"] == (1, 48, 48)
    with pytest.raises(DataError, match="unknown option 'objects'.*n, size, items"):
        DataSpec.parse("fmnist-scenes:objects=3")
    with pytest.raises(DataError, match="--task panoptic"):
        build_dataset("fmnist-scenes:n=10", "train")
    with pytest.raises(DataError, match="needs a path"):
        DataSpec.parse("coco")
    with pytest.raises(DataError, match="no dense labels.*--task"):
        build_dense_dataset("fashion-mnist", "train")
    with pytest.raises(DataError, match="items=0"):
        FmnistScenes("train", n=5, max_items=0)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_collate():
    ds = FmnistScenes("test", n=4)
    images, targets = collate_scenes([ds[i] for i in range(4)])
    assert images.shape == (4, 1, 64, 64) and len(targets) == 4
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_scenes)
    batch_images, batch_targets = next(iter(loader))
    torch.testing.assert_close(batch_images, images[:2])
    assert torch.equal(batch_targets[1]["masks"], targets[1]["masks"])


# ---------------------------------------------------------------------------------------------------------------------
# coco:PATH, on a tiny set written here: 3 fmnist-scenes canvases as PNGs, RLE masks + one polygon


def _write_coco(root, scenes: FmnistScenes, count: int = 3) -> list[dict]:
    mask_api = pytest.importorskip("pycocotools.mask")
    from PIL import Image

    (root / "images").mkdir(parents=True)
    images, annotations, targets = [], [], []
    for k in range(count):
        image, target = scenes[k]
        pixels = ((image[0] * FMNIST_STD[0] + FMNIST_MEAN[0]) * 255).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(root / "images" / f"scene{k}.png")
        images.append({"id": 100 + k, "file_name": f"scene{k}.png", "height": 64, "width": 64})
        for mask, label in zip(target["masks"].numpy(), target["labels"].tolist()):
            rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + k, "category_id": 2 * label + 5,
                                "segmentation": rle, "area": int(mask.sum()), "iscrowd": 0,
                                "bbox": [0, 0, 1, 1]})
        targets.append(target)
    # a crowd region, skipped
    annotations.append({"id": 999, "image_id": 100, "category_id": 5, "iscrowd": 1, "area": 16, "bbox": [0, 0, 4, 4],
                        "segmentation": {"size": [64, 64], "counts": [0, 4, 60, 4, 60, 4, 60, 4, 3836]}})
    categories = [{"id": 2 * c + 5, "name": name} for c, name in enumerate(CLASS_NAMES[:10])]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))
    return targets


def test_coco_set_reads_back_the_scenes(tmp_path):
    scenes = FmnistScenes("test", n=3)
    targets = _write_coco(tmp_path, scenes)
    everything = [CocoScenes(tmp_path, split) for split in ("train", "val", "test")]
    ids = [d.image_ids for d in everything]
    assert sorted(sum(ids, [])) == [100, 101, 102] and all(len(i) == 1 for i in ids)  # 3 images: 1 + 1 + 1
    assert everything[0].classes == list(CLASS_NAMES) and everything[0].background == 10
    for ds in everything:
        image, target = ds[0]
        k = ds.image_ids[0] - 100
        expected = targets[k]
        torch.testing.assert_close(image, scenes[k][0], atol=0.51 / 255 / FMNIST_STD[0], rtol=0)  # PNG rounding
        assert torch.equal(target["semantic"], expected["semantic"])
        order = target["masks"].flatten(1).sum(1).argsort(descending=True, stable=True)
        assert sorted(target["labels"].tolist()) == sorted(expected["labels"].tolist())
        # the same masks, in area order (largest first)
        by_area = expected["masks"].flatten(1).sum(1).argsort(descending=True, stable=True)
        assert torch.equal(target["masks"], expected["masks"][by_area]) and order.tolist() == sorted(order.tolist())
        torch.testing.assert_close(target["boxes"], expected["boxes"][by_area])
    info = dataset_info(f"coco:{tmp_path}")
    assert info["num_classes"] == 11 and info["classes"][-1] == "background"
    assert len(build_dense_dataset(f"coco:{tmp_path}", "train")) == 1


def test_coco_polygon_resized(tmp_path):
    pytest.importorskip("pycocotools")
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (128, 96), (200, 30, 30)).save(tmp_path / "images" / "a.jpg")
    square = [16.0, 16.0, 80.0, 16.0, 80.0, 64.0, 16.0, 64.0]  # x 16..80, y 16..64 of a 128 x 96 image
    (tmp_path / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 96, "width": 128}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": [square], "area": 3072,
                         "iscrowd": 0, "bbox": [16, 16, 64, 48]}],
        "categories": [{"id": 7, "name": "square"}]}))
    image, target = CocoScenes(tmp_path, "val", size=32, in_chans=3)[0]
    assert image.shape == (3, 32, 32) and target["labels"].tolist() == [0]
    assert target["boxes"].tolist() == [[4.0, 5.0, 20.0, 21.0]]  # x 16..80 / 4, y 16..64 / 3, as pixel extents
    assert (target["semantic"] == 1).sum() == 32 * 32 - target["masks"].sum()  # background = 1 class after 1 thing


def test_coco_bad_input(tmp_path):
    pytest.importorskip("pycocotools")
    with pytest.raises(DataError, match="annotations.json not found"):
        CocoScenes(tmp_path / "nowhere")
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        CocoScenes(tmp_path)
    (tmp_path / "annotations.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="lacks annotations, categories"):
        build_dense_dataset(f"coco:{tmp_path}", "train")
    (tmp_path / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "gone.png", "height": 8, "width": 8}],
        "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(DataError, match="gone.png.*not found"):
        CocoScenes(tmp_path)
    (tmp_path / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "gone.png", "height": 8, "width": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4]],
                         "area": 8, "iscrowd": 0, "bbox": [0, 0, 4, 4]}],
        "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(DataError, match=r"category ids \[3\]"):
        CocoScenes(tmp_path)
