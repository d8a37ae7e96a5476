"""GLSim (vitlab/engine/glsim.py): similarity top-k, the official box arithmetic, crop resize and the aggregator."""
import torch

import vitlab
from vitlab.data import build_dataset
from vitlab.engine.glsim import (GLSimViT, crop_resize, mean_logits, patch_boxes, similarity_boxes,
                                 top_similar_patches, train_aggregator_)


def test_top_patches_are_those_most_cosine_similar_to_the_class_token():
    cls = torch.tensor([1.0, 0.0, 0.0])
    patches = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.1, 0.0], [-1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    tokens = torch.cat([cls[None], patches])[None]                  # (1, 1 + 5, 3)
    assert top_similar_patches(tokens, num_prefix=1, top_k=3).tolist() == [[3, 1, 4]]


def test_boxes_follow_the_official_arithmetic():
    # 4x4 grid of 4-pixel patches (16x16 image). Patches 5 (row 1, col 1) and 10 (row 2, col 2):
    # rows 1..2 -> pixels 4 .. max(2*4, 4+4) = 8; the official box ends where the last selected row starts.
    boxes = patch_boxes(torch.tensor([[5, 10], [15, 15], [0, 15]]), (4, 4), 4, (16, 16))
    assert boxes.tolist() == [[4, 8, 4, 8], [12, 16, 12, 16], [0, 12, 0, 12]]


def test_crop_of_the_whole_image_is_the_image_and_a_constant_crop_stays_constant():
    torch.manual_seed(0)
    images = torch.randn(2, 1, 8, 8)
    images[1, :, 0:4, 4:8] = 3.0
    crops = crop_resize(images, torch.tensor([[0, 8, 0, 8], [0, 4, 4, 8]]))
    torch.testing.assert_close(crops[0], images[0])
    torch.testing.assert_close(crops[1], torch.full((1, 8, 8), 3.0))


def test_similarity_boxes_use_the_model_grid():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit").eval()             # 16x16 input, 4x4 grid of 4-pixel cells
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(3, 1, 16, 16))
    boxes = similarity_boxes(model, tokens, (16, 16), top_k=2)
    expected = patch_boxes(top_similar_patches(tokens, 1, 2), (4, 4), 4, (16, 16))
    assert torch.equal(boxes, expected)
    assert ((boxes[:, 1] - boxes[:, 0]) >= 4).all() and ((boxes[:, 3] - boxes[:, 2]) >= 4).all()


def test_glsim_logits_are_the_aggregated_first_class_token():
    torch.manual_seed(0)
    model = GLSimViT(vitlab.create_model("vl_test_vit"), top_k=4).eval()
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        cls = model.class_tokens(images)
        by_hand = model.head(model.norm(model.aggregator(cls))[:, 0])
        torch.testing.assert_close(model(images), by_hand)
        backbone = model.backbone
        torch.testing.assert_close(cls[:, 0], backbone.forward_features(images)[:, 0])
        tokens = backbone.forward_features(images)
        crops = crop_resize(images, similarity_boxes(backbone, tokens, (16, 16), 4))
        torch.testing.assert_close(cls[:, 1], backbone.forward_features(crops)[:, 0])
        torch.testing.assert_close(mean_logits(backbone, images, 4),
                                   0.5 * (backbone(images) + backbone(crops)))


def test_train_aggregator_leaves_the_backbone_frozen():
    torch.manual_seed(0)
    model = GLSimViT(vitlab.create_model("vl_test_vit"), top_k=4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = model.head.weight.clone()
    data = build_dataset("synthetic:n=32,classes=10", "train", img_size=16)
    train_aggregator_(model, data, steps=3, images=32, batch_size=8)
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(head, model.head.weight)
