"""moving-fashion-mnist-pose keypoints (against each item rendered alone), PAAB's mask (brute force and the official
block's output on a tiny config), PAAT's targets and loss (hand cases), and the vl_*paab models."""
import pytest
import timm
import torch

import vitlab  # noqa: F401  (registers the vl_ models)
from vitlab.data import build_dataset, dataset_info
from vitlab.data.video import CANVAS, render
from vitlab.data.video_pose import JOINTS, patch_mask
from vitlab.engine.recipes import RecipeError
from vitlab.models.paab import PAATHead, PAATRecipe, PoseAwareBlock, paat_loss, paat_targets
from vitlab.models.vivit import ViViT


@pytest.fixture(scope="module")
def pose_set():
    return build_dataset("moving-fashion-mnist-pose:clips=20", "train", img_size=32)


def test_keypoints_match_each_rendered_silhouette(pose_set):
    assert dataset_info("moving-fashion-mnist-pose")["num_classes"] == 6
    for index in range(3):
        clip, label, keypoints = pose_set[index]
        cls_clip, cls_label = build_dataset("moving-fashion-mnist-cls:clips=20", "train", img_size=32)[index]
        assert label == cls_label and torch.equal(clip, cls_clip)  # the same clips as the -cls set
        picks, corners = pose_set.trajectory(index)
        pixels = keypoints.double() * CANVAS - 0.5  # (T, K J, 2) back to canvas pixel (column, row)
        for k in range(len(picks)):
            alone = render(pose_set.images[picks[k:k + 1], 0], corners[:, k:k + 1])  # (T, 64, 64) only item k
            for t in range(0, len(corners), 3):
                rows, cols = torch.nonzero(alone[t] > 0, as_tuple=True)
                top, bottom, left, right, centroid = pixels[t, k * len(JOINTS):(k + 1) * len(JOINTS)]
                for (c, r) in (top, bottom, left, right):
                    assert alone[t, round(float(r)), round(float(c))] > 0  # an extreme point is a silhouette pixel
                assert top[1] == rows.min() and bottom[1] == rows.max()
                assert left[0] == cols.min() and right[0] == cols.max()
                assert top[0] == cols[rows == rows.min()].min() and left[1] == rows[cols == cols.min()].min()
                torch.testing.assert_close(centroid, torch.stack([cols, rows], 1).double().mean(0))


def test_patch_mask_brute_force():
    g = torch.Generator().manual_seed(0)
    keypoints = torch.rand(2, 4, 3, 2, generator=g) * 1.2 - 0.1  # some outside the frame
    mask = patch_mask(keypoints, (2, 3, 4), tubelet=2)
    expected = torch.zeros(2, 2, 12, dtype=torch.bool)
    for b in range(2):
        for t in range(4):
            for x, y in keypoints[b, t].tolist():
                if 0 <= x < 1 and 0 <= y < 1:
                    expected[b, t // 2, int(y * 3) * 4 + int(x * 4)] = True
    assert torch.equal(mask, expected)


def _block(dim=16, heads=2):
    torch.manual_seed(0)
    block = PoseAwareBlock(dim, heads, mlp_ratio=2, qkv_bias=True).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 1 else 0.2)
    return block


def test_paab_attention_reaches_only_pose_patches():
    """Brute force: changing any non-pose token (or a token of another frame) leaves every pose token's output as
    it was; changing a pose token of the same frame changes them; non-pose tokens come out as they went in."""
    block, B, T, N, D = _block(), 1, 2, 6, 16
    pose = torch.tensor([[[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]]], dtype=torch.bool)  # (B, T, N)
    x = torch.randn(B, 1 + T * N, D)
    with torch.no_grad():
        out = block.forward_pose(x, pose)
        assert torch.equal(out[:, 1:][~pose.reshape(B, -1)], x[:, 1:][~pose.reshape(B, -1)])
        for t in range(T):
            frame_pose = [1 + t * N + n for n in range(N) if pose[0, t, n]]
            for n in range(T * N):
                moved = x.clone()
                moved[:, 1 + n] += 3.0
                changed = (block.forward_pose(moved, pose)[0, frame_pose] - out[0, frame_pose]).abs().amax()
                if n // N == t and pose[0, t, n % N]:
                    assert changed > 1e-3, (t, n)
                else:
                    assert changed == 0, (t, n)


def test_paab_matches_official_block():
    """tests/fixtures/paab_official.pt: PoseAwareVT's PoseBlockSpatial + its Block's blend (paab_make_fixture.py)."""
    ref = torch.load("tests/fixtures/paab_official.pt", weights_only=True)
    cfg = ref["config"]
    block = PoseAwareBlock(cfg["D"], cfg["heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=True).eval()
    block.norm1.eps = block.norm2.eps = 1e-5  # torch's LayerNorm default, as the official block's
    block.load_state_dict(ref["state_dict"])
    with torch.no_grad():
        out = block.forward_pose(ref["x"], ref["pose"])
    torch.testing.assert_close(out, ref["out"], atol=2e-5, rtol=1e-5)


def test_paat_targets_and_loss_hand_case():
    keypoints = torch.tensor([[[[0.1, 0.1], [0.9, 0.6]], [[0.6, 0.1], [0.9, 0.6]]]])  # (B=1, T=2, J=2, 2)
    targets = paat_targets(keypoints, (1, 2, 2), tubelet=2)  # (1, 4 patches, 2 joints)
    expected = torch.zeros(1, 4, 2)
    expected[0, 0, 0] = expected[0, 1, 0] = 1  # joint 0 in patch (0, 0) then (0, 1) within the tubelet
    expected[0, 3, 1] = 1  # joint 1 in patch (1, 1)
    assert torch.equal(targets, expected)
    logits = torch.tensor([[[2.0, -1.0], [0.0, 0.5], [-3.0, 1.0], [1.0, 4.0]]])
    p = torch.sigmoid(logits)
    by_hand = -(expected * p.log() + (1 - expected) * (1 - p).log()).mean()
    torch.testing.assert_close(paat_loss(logits, expected), by_hand)
    torch.testing.assert_close(paat_loss(torch.full((1, 4, 2), -40.0), torch.zeros(1, 4, 2)), torch.tensor(0.0),
                               atol=1e-12, rtol=0)


def test_vl_test_paab_gradients_and_mask_semantics(pose_set):
    torch.manual_seed(0)
    model = timm.create_model("vl_test_paab")
    assert model.num_frames == 10 and model.paab_after == 2
    clips = torch.stack([pose_set[i][0] for i in range(2)])
    keypoints = torch.stack([pose_set[i][2] for i in range(2)])
    labels = torch.tensor([pose_set[i][1] for i in range(2)])
    head = PAATHead(model.embed_dim, keypoints.shape[2], hidden=16)
    tokens = []
    model.blocks[0].register_forward_hook(lambda module, args, out: tokens.append(out))
    logits = model(clips, keypoints)
    targets = paat_targets(keypoints, model.patch_embed.grid_size, 2)
    aux = paat_loss(head(tokens[-1][:, 1:]), targets)
    (torch.nn.functional.cross_entropy(logits, labels) + aux).backward()
    for name, p in [*model.named_parameters(), *head.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    host = ViViT(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=32, depth=2,
                 temporal_depth=0, num_heads=2, num_classes=6)
    missing, unexpected = host.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("paab.") for k in unexpected)
    with torch.no_grad():
        all_pose = torch.ones(2, 5, 16, dtype=torch.bool)
        features = model.blocks(torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(clips).flatten(1, 2)],
                                          1) + model.pos_embed)
        expected = model.forward_head(model.norm(model.paab.forward_pose(features, all_pose)))
        torch.testing.assert_close(model(clips), expected)  # without keypoints every patch is a pose patch
        assert (model(clips, keypoints) - model(clips)).abs().amax() > 1e-4
        assert (model(clips, keypoints) - host(clips)).abs().amax() > 1e-4


def test_paat_recipe_trains_through_the_cli(tmp_path, capsys):
    from vitlab.cli import main

    code = main(["train", "--model", "vl_test_vivit_joint", "--data", "moving-fashion-mnist-pose:clips=16",
                 "--epochs", "1", "--out", str(tmp_path / "refused")])
    assert code not in (0, None) and "train on moving-fashion-mnist-cls" in capsys.readouterr().err

    out = tmp_path / "run"
    code = main(["train", "--model", "vl_test_vivit_joint", "--data", "moving-fashion-mnist-cls:clips=16",
                 "--recipe", "paat:after=1,hidden=8", "--epochs", "1", "--batch-size", "8", "--threads", "1",
                 "--out", str(out)])
    assert code in (0, None) and any(out.iterdir())
    with pytest.raises(RecipeError, match="supports video models"):
        PAATRecipe().setup(timm.create_model("vl_test_vivit"), None, None, None)
