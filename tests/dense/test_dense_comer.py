"""ViT-CoMer (vitlab.dense.comer): the ViT stream equals timm's at initialisation, the pyramid's shapes, parity with
the official code (Traffic-X/ViT-CoMer@b57f386, run locally on CPU, output stored in tests/fixtures/comer/), the
registered `comer` head, and what it refuses."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import vitlab
from vitlab.dense.comer import ViTCoMer
from vitlab.dense.heads import build_dense_model, parse_head
from vitlab.errors import UserError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "comer" / "official_b57f386.safetensors"
# The official ViT-CoMer-T recipe shrunk: patch 16 at 64 px (4 x 4 tokens), width 32, 4 blocks, 2 deformable heads.
PARITY_VIT = dict(img_size=64, patch_size=16, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0,
                  qkv_bias=True, class_token=False, global_pool="avg", init_values=1.0, num_classes=0)
PARITY_COMER = dict(conv_inplane=8, n_points=4, deform_num_heads=2, cffn_ratio=0.25, deform_ratio=1.0, dim_ratio=6.0)


def fill_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter from a seeded generator, in name order (1-D weights, i.e. norms, around 1), so
    the official model and ours get the same non-trivial weights (gamma != 0: the CNN -> ViT path is live)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(noise + 1.0 if p.dim() == 1 and name.endswith("weight") else noise)
    return model


def parity_input() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _tiny_comer(**vit_kwargs) -> tuple[ViTCoMer, VisionTransformer]:
    """ViT-CoMer around vl_test_vit (class token, 16 px, stride-4 tokens) and an untouched copy of the ViT."""
    torch.manual_seed(0)
    vit = vitlab.create_model("vl_test_vit", **{"depth": 4, **vit_kwargs})
    reference = copy.deepcopy(vit)
    return ViTCoMer(vit, conv_inplane=8, deform_num_heads=2), reference


def _block_outputs(blocks: nn.Sequential, run) -> list[torch.Tensor]:
    outs = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in blocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return outs


def test_vit_stream_equals_timm_at_initialisation():
    comer, reference = _tiny_comer()
    comer.eval(), reference.eval()
    x = torch.randn(3, 1, 16, 16)
    expected = _block_outputs(reference.blocks, lambda: reference.forward_features(x))
    got = _block_outputs(comer.model.blocks, lambda: comer(x))
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the CNN really is wired in: a non-zero injection gain changes the tokens every block sees after the first
    with torch.no_grad():
        for layer in comer.interactions:
            layer.cti_tov.gamma.fill_(0.5)
    changed = _block_outputs(comer.model.blocks, lambda: comer(x))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(changed, expected))


@pytest.mark.parametrize("stem_strides,strides", [((2, 2, 2), [2, 4, 8, 16]), ((1, 2, 2), [1, 2, 4, 8])])
def test_pyramid_shapes_follow_the_patch_stride(stem_strides, strides):
    vit = vitlab.create_model("vl_test_vit", depth=4, img_size=32, stem_widths=(8, 8, 16), stem_strides=stem_strides)
    comer = ViTCoMer(vit, conv_inplane=8, deform_num_heads=4)
    maps = comer(torch.randn(2, 1, 32, 32))
    assert comer.strides == strides and comer.channels == [32] * 4
    assert [tuple(m.shape) for m in maps] == [(2, 32, 32 // s, 32 // s) for s in strides]


def test_gamma_starts_at_zero_and_every_parameter_trains():
    comer, _ = _tiny_comer()
    assert all(torch.equal(layer.cti_tov.gamma, torch.zeros(32)) for layer in comer.interactions)
    sum(m.square().mean() for m in comer(torch.randn(2, 1, 16, 16))).backward()
    missing = [n for n, p in comer.named_parameters() if p.grad is None]
    assert not missing
    assert all(layer.cti_tov.gamma.grad.abs().sum() > 0 for layer in comer.interactions)


def test_matches_official_code():
    """Official ViTCoMer (b57f386, CPU shim: its own `ms_deform_attn_core_pytorch` for the CUDA op, BatchNorm2d for
    SyncBatchNorm) with the same weights gave the stored pyramid; ours must give it too (train-mode BatchNorm)."""
    from safetensors import safe_open

    torch.manual_seed(0)
    comer = fill_(ViTCoMer(VisionTransformer(**PARITY_VIT), **PARITY_COMER)).train()
    maps = comer(parity_input())
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
        expected = [f.get_tensor(f"f{i}") for i in range(1, 5)]
    assert json.loads(meta["vit"]) == PARITY_VIT and json.loads(meta["comer"]) == PARITY_COMER
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_registered_head_builds_a_semantic_model():
    entry, options = parse_head("comer:deform_num_heads=2,conv_inplane=8,fpn_dim=16", "semantic")
    assert entry.wraps_model and options["deform_num_heads"] == 2
    model = build_dense_model("vl_test_vit", "comer", "semantic", 11, img_size=16, head_options=options)
    out = model(torch.randn(2, 1, 16, 16))
    assert out["sem_logits"].shape == (2, 11, 16, 16)  # stride-4 tokens -> finest level at stride 1
    assert isinstance(model.backbone.model, VisionTransformer)  # the contract and techniques see the ViT


def test_refuses_what_it_does_not_support():
    with pytest.raises(UserError, match="supports plain timm VisionTransformer"):
        ViTCoMer(nn.Linear(2, 2))
    with pytest.raises(UserError, match="must divide the ViT width"):
        ViTCoMer(vitlab.create_model("vl_test_vit"), deform_num_heads=6)
    comer, _ = _tiny_comer()
    vitlab.apply_(comer.model, vitlab.parse_apply(["tome:r=2"]))  # merges tokens inside the ViT's blocks
    with pytest.raises(UserError, match="keep every patch token"):
        comer(torch.randn(2, 1, 16, 16))
    with pytest.raises(UserError, match="patch stride 4, 8 or 16"):
        ViTCoMer(vitlab.create_model("vl_test_vit", img_size=32, stem_widths=(8, 8, 8, 8, 16),
                                     stem_strides=(2, 2, 2, 2, 2)), deform_num_heads=2)
