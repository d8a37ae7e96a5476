"""ViViT: model 1 against HF transformers' VivitModel (weights copied), model 2 (factorised encoder) against the
same HF modules composed as scenic's SpaceTimeViViT composes its encoders, and the model contract."""
import copy
import json

import pytest
import torch

import vitlab
from vitlab.engine.evaluate import check_input_shape
from vitlab.errors import UserError
from vitlab.models import from_transformers
from vitlab.runner import TorchRunner

transformers = pytest.importorskip("transformers")


def _hf_config(num_frames: int = 6, act: str = "gelu_fast", **kwargs):
    return transformers.VivitConfig(image_size=32, num_frames=num_frames, tubelet_size=[2, 8, 8], num_channels=1,
                                    hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, num_labels=5, hidden_act=act, **kwargs)


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Random non-trivial weights everywhere (HF initialises cls / position embeddings to zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.mark.parametrize("act", ["gelu_fast", "gelu"])
def test_joint_matches_hf_vivit_classification(act):
    hf = _perturbed(transformers.VivitForVideoClassification(_hf_config(num_frames=6, act=act)))  # non-default T
    ours = from_transformers(hf)
    assert not ours.factorised and ours.num_frames == 6
    for batch in (1, 3):
        clip = torch.randn(batch, 6, 1, 32, 32)  # HF layout (B, T, C, H, W)
        with torch.no_grad():
            expected = hf(pixel_values=clip).logits
            got = ours(clip.transpose(1, 2))  # ours (B, C, T, H, W)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_joint_features_match_hf_vivit_model():
    hf = _perturbed(transformers.VivitModel(_hf_config(num_frames=4)))
    ours = from_transformers(hf)
    clip = torch.randn(2, 4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(clip.transpose(1, 2)),
                                   hf(pixel_values=clip).last_hidden_state, rtol=0, atol=1e-5)


def _load_hf_encoder(hf_model, cls_token, pos_embed, blocks, norm) -> None:
    """Our (cls, position embedding, timm blocks, final norm) into an HF VivitModel's embeddings/layers/layernorm."""
    state = {"layernorm.weight": norm.weight, "layernorm.bias": norm.bias}
    if cls_token is not None:
        state.update({"embeddings.cls_token": cls_token, "embeddings.position_embeddings": pos_embed})
    for i, block in enumerate(blocks):
        q, k, v = block.attn.qkv.weight.chunk(3)
        qb, kb, vb = block.attn.qkv.bias.chunk(3)
        pairs = {"attention.q_proj": (q, qb), "attention.k_proj": (k, kb), "attention.v_proj": (v, vb),
                 "attention.o_proj": (block.attn.proj.weight, block.attn.proj.bias),
                 "layernorm_before": (block.norm1.weight, block.norm1.bias),
                 "layernorm_after": (block.norm2.weight, block.norm2.bias),
                 "mlp.fc1": (block.mlp.fc1.weight, block.mlp.fc1.bias),
                 "mlp.fc2": (block.mlp.fc2.weight, block.mlp.fc2.bias)}
        for name, (w, b) in pairs.items():
            state[f"layers.{i}.{name}.weight"], state[f"layers.{i}.{name}.bias"] = w, b
    missing = hf_model.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith("embeddings.") for k in missing), missing


def test_factorised_encoder_matches_hf_modules_composed_as_scenic():
    """Model 2 = HF model 1 run on each tubelet-frame (one temporal tubelet: spatial attention only, its cls token
    after the final LayerNorm), then an HF encoder over [temporal cls; frame tokens] + temporal position embedding
    (scenic SpaceTimeViViT: vmap(vit_body) over time, then vit_body over the frame tokens)."""
    ours = _perturbed(vitlab.create_model("vl_test_vivit", num_frames=6, num_classes=5))
    spatial = transformers.VivitModel(_hf_config(num_frames=2, act="gelu"), add_pooling_layer=False).eval()
    _load_hf_encoder(spatial, ours.cls_token, ours.pos_embed, ours.blocks, ours.spatial_norm)
    spatial.embeddings.patch_embeddings.projection.load_state_dict(ours.patch_embed.proj.state_dict())
    temporal = transformers.VivitModel(_hf_config(act="gelu"), add_pooling_layer=False).eval()
    _load_hf_encoder(temporal, None, None, ours.temporal_blocks, ours.norm)  # its embeddings are not used

    clip = torch.randn(3, 1, 6, 32, 32)
    with torch.no_grad():
        frames = [spatial(pixel_values=clip[:, :, t:t + 2].transpose(1, 2)).last_hidden_state[:, 0]
                  for t in range(0, 6, 2)]  # 3 tubelet-frames, each (B, D)
        x = torch.cat([ours.temporal_cls_token.expand(3, -1, -1), torch.stack(frames, 1)], 1)
        x = x + ours.temporal_pos_embed
        for layer in temporal.layers:
            x = layer(x)
        expected = ours.head(temporal.layernorm(x)[:, 0])
        torch.testing.assert_close(ours(clip), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["vl_test_vivit", "vl_test_vivit_joint"])
def test_contract(name):
    model = vitlab.create_model(name)
    clip = torch.randn(2, 1, 10, 32, 32)
    out = model(clip)
    assert out.shape == (2, 6) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    tokens = 1 + (5 if model.factorised else 5 * 16)
    assert model.forward_features(clip).shape == (2, tokens, 32)
    model.reset_classifier(3)
    assert model(clip).shape == (2, 3)
    assert model.forward_head(model.forward_features(clip), pre_logits=True).shape == (2, 32)
    again = vitlab.create_model(name, num_classes=3)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.eval()(clip), model.eval()(clip))
    with pytest.raises(ValueError, match=r"clips \(B, C, T, H, W\) with \(C, T, H, W\) = \(1, 10, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))


def test_engine_shape_check_takes_clips():
    runner = TorchRunner(vitlab.create_model("vl_test_vivit"))
    assert runner.input_size == (1, 32, 32)
    check_input_shape(torch.zeros(2, 1, 10, 32, 32), runner)
    with pytest.raises(UserError, match="1x8x32x32 but the model expects 1x10x32x32"):
        check_input_shape(torch.zeros(2, 1, 8, 32, 32), runner)


def test_factorised_base_has_the_papers_shape():
    with torch.device("meta"):
        model = vitlab.create_model("vl_vivit_b_fe")
    assert len(model.blocks) == 12 and len(model.temporal_blocks) == 4
    assert model.patch_embed.grid_size == (16, 14, 14) and model.pos_embed.shape == (1, 1 + 196, 768)
    assert model.temporal_pos_embed.shape == (1, 17, 768)


def test_example_shapes_are_clips():
    from vitlab.runner import example_shape, item_shape

    model = vitlab.create_model("vl_test_vivit")
    assert example_shape(model) == item_shape(TorchRunner(model)) == (1, 10, 32, 32)
    assert example_shape(vitlab.create_model("vl_test_vit", img_size=32)) == (1, 32, 32)   # gray images: no frames


@pytest.mark.parametrize("name,text", [("vl_test_vivit", "tome:r=1"), ("vl_test_vivit_joint", "tome:r=8"),
                                       ("vl_test_vivit_joint", "evit:keep_rate=0.9")])
def test_token_reduction_over_tubelets_stays_close(name, text):
    """Merging or pruning a few of the tubelet tokens changes the logits a little, not wholesale; r=0 not at all."""
    torch.manual_seed(0)
    model = vitlab.create_model(name).eval()
    x = torch.randn(4, 1, 10, 32, 32)
    with torch.no_grad():
        ref = model(x)
        exact = vitlab.apply_(copy.deepcopy(model), vitlab.parse_apply(["tome:r=0"]))(x)
        out = vitlab.apply_(copy.deepcopy(model), vitlab.parse_apply([text]))(x)
    assert torch.equal(exact, ref)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel


def test_bench_runs_a_video_model_on_synthetic_clips(capsys):
    from vitlab.cli import main

    args = ["bench", "vl_test_vivit", "--data", "synthetic:n=8,frames=10,classes=6", "--no-memory", "--min-time",
            "0.01", "--batch", "2", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--apply", "tome:r=1"]) == 0
    tome = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain, tome = (r[0] if isinstance(r, list) else r for r in (plain, tome))
    assert 0 < tome["macs"] < plain["macs"]
