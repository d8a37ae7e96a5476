"""UniFormerV2 (vitlab/models/uniformerv2.py): logits against the official code on a tiny config, the B/16 parameter
count against the official constructor, the paper's zero-init identity (the armed model starts as the image ViT on
frame-averaged features), arming from a timm ViT, the local MHRA's temporal reach, and the contract.

tests/fixtures/uniformerv2_tiny.pt was written by running the official `slowfast/models/uniformerv2_model.py`
(github.com/OpenGVLab/UniFormerV2 at 722a43440fc5b9662cc2a8f23b86caa205e45ebc; `slowfast.utils.logging` shimmed by
`logging.getLogger`) on CPU: `VisionTransformer(input_resolution=24, patch_size=8, width=24, layers=3, heads=2,
t_size=4, temporal_downsample=True, double_lmhra=True, return_list=[1, 2], n_layers=2, n_dim=24, n_head=2,
num_classes=5)`, seed 0, every parameter perturbed by N(0, 0.1^2) (so the zero-initialised parts are exercised)
and BN running statistics randomised; eval mode on 2 clips (3, 4, 24, 24). It also holds
`sum(p.numel() for p in uniformerv2_b16(pretrained=False).parameters())`.
"""
import copy
from pathlib import Path

import pytest
import timm
import torch

import vitlab
from vitlab.models.uniformerv2 import ArmingError, UniFormerV2, arm_image_vit, convert_official_state_dict

FIXTURE = Path(__file__).parents[1] / "fixtures" / "uniformerv2_tiny.pt"


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE, weights_only=True)


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _image_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2,
                            in_chans=1, num_classes=6)
    return _perturb(vit, 0.05)


def test_matches_the_official_code(official):
    assert official["commit"] == "722a43440fc5b9662cc2a8f23b86caa205e45ebc"
    model = vitlab.create_model("vl_test_uniformerv2", img_size=24, embed_dim=24, in_chans=3, num_frames=4,
                                num_classes=5).eval()
    model.load_state_dict(convert_official_state_dict(official["state_dict"]), strict=True)
    with torch.no_grad():
        got = model(official["clips"])
    torch.testing.assert_close(got, official["logits"], atol=1e-5, rtol=1e-5)


def test_b16_parameter_count_equals_the_official_constructor(official):
    with torch.device("meta"):
        model = vitlab.create_model("vl_uniformerv2_b16")
    assert sum(p.numel() for p in model.parameters()) == official["b16_params"] == 134_722_960


def _frame_class_tokens(model: UniFormerV2, clips: torch.Tensor) -> torch.Tensor:
    """The image ViT's path by hand: every (tubelet-)frame through plain timm Block.forward (no local MHRA), class
    token after the last block, (B, T', D)."""
    from timm.models.vision_transformer import Block

    x = model.patch_embed(clips)                                           # (B, D, T', h, w)
    B, D, T = x.shape[:3]
    x = x.flatten(3).permute(0, 2, 3, 1).flatten(0, 1)                     # (B T', h w, D)
    x = model.norm_pre(torch.cat([model.cls_token.expand(B * T, -1, -1), x], 1) + model.pos_embed)
    for block in model.blocks:
        x = Block.forward(block, x)
    return x[:, 0].reshape(B, T, D)


def test_zero_init_identity():
    """UniFormerV2 Sec. 3 (zero-initialised local MHRA, decoder projections, query and balance): with them zeroed,
    the output is the head on 0.5 times the frame-averaged class token of the image ViT, which the head's LayerNorm
    makes the image ViT's head on its frame-averaged features."""
    model = _perturb(vitlab.create_model("vl_test_uniformerv2"))
    clips = torch.randn(2, 1, 10, 32, 32)
    with torch.no_grad():
        armed = model(clips)
        for block in model.blocks:
            for lmhra in (block.lmhra1, block.lmhra2):
                lmhra.expand.weight.zero_()
                lmhra.expand.bias.zero_()
        for layer in model.decoder:
            for linear in (layer.proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        model.query_token.zero_()
        model.balance.zero_()                                              # the head reads 0.5 * the frame mean
        got = model(clips)
        mean = _frame_class_tokens(model, clips).mean(1)
        expected = model.head(model.fc_norm(0.5 * mean))
        image_head = model.head(model.fc_norm(mean))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, image_head, atol=1e-3, rtol=1e-3)    # LayerNorm(s * z) = LayerNorm(z) up to eps
    assert (armed - got).abs().max() > 1e-2                                # the video parts did act before zeroing


def test_arming_a_timm_vit_starts_as_the_image_model():
    vit = _image_vit()
    model = arm_image_vit(vit, num_frames=10).eval()
    assert model.return_list == (0, 1, 2) and model.num_frames == 10
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    frame = torch.randn(2, 1, 32, 32)
    static = frame[:, :, None].expand(-1, -1, 10, -1, -1)
    clips = torch.randn(2, 1, 10, 32, 32)
    with torch.no_grad():
        # a static clip: every frame's logits are the image model's
        torch.testing.assert_close(model(static), vit(frame), atol=1e-5, rtol=1e-4)
        # any clip: the image head on the class token averaged over every second frame (the inflated kernel's
        # centre reads frames 0, 2, 4, ...); close to, not equal to, the average of the per-frame logits
        frames = clips[:, :, 0::2].transpose(1, 2).flatten(0, 1)            # (B * 5, 1, 32, 32)
        cls = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(frames))))[:, 0].reshape(2, 5, -1)
        torch.testing.assert_close(model(clips), vit.head(vit.norm(cls.mean(1))), atol=1e-5, rtol=1e-4)
        per_frame = vit(frames).reshape(2, 5, -1).mean(1)
        assert (model(clips) - per_frame).abs().max() < 0.05


def test_arming_refuses_what_it_cannot_copy():
    with pytest.raises(ArmingError, match="supports timm ViTs.*patch embedding"):
        arm_image_vit("vl_test_vit")                       # a conv-stem hybrid: no single patch conv to inflate
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                            global_pool="avg")
    with pytest.raises(ArmingError, match="class token"):
        arm_image_vit(vit)


def test_local_mhra_reaches_one_frame_each_way():
    """The depthwise (3, 1, 1) temporal conv: a change at tubelet-frame t moves only frames t-1..t+1, and only at
    the same grid position."""
    block = _perturb(vitlab.create_model("vl_test_uniformerv2")).blocks[0]
    lmhra = block.lmhra1
    x = torch.randn(1, 32, 5, 4, 4)
    y = x.clone()
    y[0, :, 2, 1, 3] += 1.0
    with torch.no_grad():
        moved = (lmhra(y) - lmhra(x)).abs().sum(1)[0]                       # (T, h, w)
    assert (moved[1:4, 1, 3] > 0).all() and moved[0].max() == 0 and moved[4].max() == 0
    moved[:, 1, 3] = 0
    assert moved.max() == 0


def test_contract_and_token_reduction_refusal():
    from vitlab.contract import describe

    model = vitlab.create_model("vl_test_uniformerv2").eval()
    spec = describe(model)
    assert spec.family == "uniformerv2" and [b.name for b in spec.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert not any(b.token_reducible for b in spec.blocks)                # the local MHRA needs the grid
    for text in ("tome:r=2", "evit:keep_rate=0.7", "ats", "mctf:r=2"):
        with pytest.raises(vitlab.TechniqueNotApplicable, match="UniBlock.*local MHRA.*grid.*supports"):
            vitlab.apply_(copy.deepcopy(model), vitlab.parse_apply([text]))
