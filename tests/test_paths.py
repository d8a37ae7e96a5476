"""Path ensembles (vitlab/explain/paths.py): the exact decomposition, weights, pruning and EnsembleScale."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.errors import TechniqueNotApplicable
from vitlab.explain.paths import (ensemble_logits, ensemble_scale, path_features, path_names, path_report,
                                  prune_paths)


@pytest.mark.parametrize("kwargs", [{}, {"init_values": 0.1}, {"global_pool": "avg"}])
def test_the_paths_sum_to_the_model(kwargs):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", **kwargs).eval()    # LayerScale and mean pooling too
    images = torch.randn(3, 1, 16, 16)
    paths = path_features(model, images)
    assert paths.shape == (3, 1 + 2 * len(model.blocks), model.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(ensemble_logits(model, paths), model(images))


def test_a_path_is_its_branch_output_and_weights_scale_direct_contributions_only():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit").eval()
    images = torch.randn(2, 1, 16, 16)
    paths = path_features(model, images)
    with torch.no_grad():
        x0 = model._pos_embed(model.patch_embed(images))       # (B, T, D) input of block 0
        x0 = model.norm_pre(model.patch_drop(x0))
        blk = model.blocks[0]
        attn = blk.ls1(blk.attn(blk.norm1(x0)))
        torch.testing.assert_close(paths[:, 0], x0[:, 0])
        torch.testing.assert_close(paths[:, 1], attn[:, 0])
        torch.testing.assert_close(paths[:, 2], blk.ls2(blk.mlp(blk.norm2(x0 + attn)))[:, 0])
        w = torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0])
        by_hand = model.head(model.norm(paths[:, 0] + 2 * paths[:, 2] + paths[:, 3] + paths[:, 4]))
        torch.testing.assert_close(ensemble_logits(model, paths, w), by_hand)
    assert path_names(model) == ["embed", "attn1", "mlp1", "attn2", "mlp2"]


def test_report_pruning_and_scale_on_a_planted_bad_path():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=3).eval()
    paths = path_features(model, torch.randn(64, 1, 16, 16))
    labels = ensemble_logits(model, paths).argmax(-1).detach()     # the model is right on every image ...
    paths[:, 3] += 5 * torch.randn(64, model.embed_dim)             # ... until path attn2 is corrupted
    report = path_report(model, paths, labels)
    assert [r["path"] for r in report] == path_names(model)
    assert report[3]["without"] == 1.0 and report[-1]["up_to"] < 1.0
    weights = prune_paths(model, paths, labels)
    assert weights[3] == 0
    with torch.no_grad():
        assert F.cross_entropy(ensemble_logits(model, paths, weights), labels) < \
            F.cross_entropy(ensemble_logits(model, paths), labels)
    scaled = ensemble_scale(model, paths, labels, steps=60, batch_size=64, lr=0.05)
    assert abs(float(scaled[3])) < 0.8
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_other_models_are_refused_with_what_is_supported():
    with pytest.raises(TechniqueNotApplicable, match="supports"):
        path_features(torch.nn.Linear(2, 2), torch.randn(1, 2))
