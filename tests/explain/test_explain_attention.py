"""Raw attention maps, attention rollout, their overlays and `vitlab explain --method`: checked against attention
and rollout written out by hand from the weights, across token reduction, pruning, int8 simulation and Swin."""
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.explain import ExplainError
from vitlab.explain.attention import capture_attention, rollout_method
from vitlab.explain.plot import plot_explanations

REF = Path(__file__).resolve().parents[2] / "checkpoints"


def _tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return vitlab.create_model("vl_test_vit", num_classes=10).eval()


def _hand_attention(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's (B, heads, N, N) softmax(q k^T / sqrt(d)), computed from its qkv weights on the block's input."""
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for block, h in zip(model.blocks, inputs):
        attn = block.attn
        B, N, C = h.shape
        qkv = attn.qkv(block.norm1(h)).reshape(B, N, 3, attn.num_heads, C // attn.num_heads)  # (B, N, 3, H, d)
        q, k = attn.q_norm(qkv[:, :, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, H, N, d)
        out.append((q @ k.transpose(-2, -1) * (C // attn.num_heads) ** -0.5).softmax(-1))
    return out


def _hand_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema, one image at a time with explicit loops."""
    B, _, N, _ = attentions[0].shape
    result = torch.zeros(B, N, N)
    for b in range(B):
        R = torch.eye(N)
        for A in attentions:
            M = 0.5 * A[b].mean(0) + 0.5 * torch.eye(N)
            M = M / M.sum(1, keepdim=True)
            R = M @ R
        result[b] = R
    return result


def test_attention_is_the_models_softmax_and_rollout_matches_hand_written():
    model, x = _tiny_vit(), torch.randn(2, 1, 16, 16)
    hand = _hand_attention(model, x)
    assert len(hand) == 2                                                  # a 2-layer tiny ViT
    e = vitlab.explain(model, x, method="attention")
    for got, want in zip(e.extras["attention"], hand):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    saliency, extras = rollout_method(model, x, torch.zeros(2, dtype=torch.long))
    R = _hand_rollout(hand)
    torch.testing.assert_close(extras["rollout"], R, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(saliency, R[:, 0, 1:].reshape(2, 4, 4), atol=1e-5, rtol=1e-4)


def test_attention_layer_and_head_select_one_map():
    model, x = _tiny_vit(), torch.randn(1, 1, 16, 16)
    hand = _hand_attention(model, x)
    from vitlab.explain.attention import attention_saliency

    layers = capture_attention(model, x)
    got = attention_saliency(layers, x, model, layer=0, head=1)
    torch.testing.assert_close(got, hand[0][:, 1, 0, 1:].reshape(1, 4, 4), atol=1e-5, rtol=1e-4)
    with pytest.raises(ExplainError, match="--head 7"):
        attention_saliency(layers, x, model, layer=0, head=7)
    with pytest.raises(ExplainError, match="--layer 5"):
        attention_saliency(layers, x, model, layer=5)


def test_tome_r0_rollout_equals_plain_and_merged_maps_are_finite():
    x = torch.randn(2, 1, 16, 16)
    plain = rollout_method(_tiny_vit(), x, None)[0]
    r0 = vitlab.apply_(_tiny_vit(), vitlab.parse_apply(["tome:r=0"]))
    torch.testing.assert_close(rollout_method(r0, x, None)[0], plain)
    merged = vitlab.apply_(_tiny_vit(), vitlab.parse_apply(["tome:r=3"]))
    layers = capture_attention(merged, x, "rollout")
    assert layers[1].probs.shape[-1] == 17 - 3                              # block 1 attends over merged tokens
    spread = layers[1].patch_space(2)                                      # mapped back to the 17 input tokens
    assert spread.shape == (2, 2, 17, 17)
    torch.testing.assert_close(spread.sum(-1), torch.ones(2, 2, 17))        # still a distribution per token
    saliency = rollout_method(merged, x, None)[0]
    assert saliency.shape == (2, 4, 4) and saliency.isfinite().all()
    assert not torch.allclose(saliency, plain)                             # merging changed the attention


def test_merged_attention_is_spread_over_the_patches_of_each_token():
    from vitlab.explain.attention import AttentionLayer

    # token 0 = input token 0; token 1 = input tokens 1 and 2 (merged)
    source = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])               # (B=1, N=2, N0=3)
    probs = torch.tensor([[[[0.25, 0.75], [0.6, 0.4]]]])                      # (B=1, H=1, 2, 2)
    want = torch.tensor([[0.25, 0.375, 0.375], [0.6, 0.2, 0.2], [0.6, 0.2, 0.2]])
    torch.testing.assert_close(AttentionLayer("a", probs, source, 1).patch_space(1)[0, 0], want)


@pytest.mark.parametrize("masked", ["none", "float", "bool"])
def test_sdpa_probabilities_reproduce_sdpa(masked):
    import torch.nn.functional as F

    from vitlab.explain.attention import sdpa_probs

    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    mask = {"none": None, "float": torch.randn(2, 1, 1, 5), "bool": torch.rand(2, 1, 5, 5) > 0.3}[masked]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True                                                  # every query sees one key
    torch.testing.assert_close(sdpa_probs(q, k, v, attn_mask=mask) @ v,
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stack", [["evit:keep_rate=0.7"], ["mctf:r=2"], ["ats"],
                                   ["prune:target_flops=0.8,importance=l1"]])
def test_reference_model_variants(stack):
    model = vitlab.apply_(vitlab.create_model(str(REF / "fashion-mnist-reference")), vitlab.parse_apply(stack))
    x = torch.randn(2, 1, 28, 28)
    for method in ("attention", "rollout"):
        e = vitlab.explain(model, x, method=method)
        assert e.maps.shape == (2, 28, 28) and e.maps.isfinite().all() and e.maps.amax() == 1
    assert len(e.extras["layers"]) == 4                                    # rollout over all four blocks


@pytest.mark.slow
def test_int8_simulated_attention_is_captured_from_the_fake_quant_softmax():
    torch.manual_seed(0)
    float_model = vitlab.create_model(str(REF / "fashion-mnist-reference")).eval()
    x = torch.randn(2, 1, 28, 28)
    q = vitlab.apply_(vitlab.create_model(str(REF / "fashion-mnist-reference")), vitlab.parse_apply(["ptq"]),
                      calib=[torch.randn(16, 1, 28, 28)])
    got = vitlab.explain(q, x, method="attention").extras["attention"]
    want = vitlab.explain(float_model, x, method="attention").extras["attention"]
    assert len(got) == len(want) == 4
    diff = max((g - w).abs().max().item() for g, w in zip(got, want))
    assert 0 < diff < 0.2                                                   # int8 noise, not another map
    assert vitlab.explain(q, x, method="rollout").maps.isfinite().all()


def test_swin_rolls_out_its_last_stage_and_refuses_window_layers():
    model = vitlab.create_model(str(REF / "fashion-mnist-swin"))
    x = torch.randn(1, 1, 32, 32)
    e = vitlab.explain(model, x, method="rollout")
    assert e.extras["layers"] == ["layers.3.blocks.0.attn"]                # 2x2 grid, one window: global
    assert e.maps.shape == (1, 32, 32) and e.maps.isfinite().all()
    with pytest.raises(ExplainError, match="within windows .*gradcam"):
        vitlab.explain(model, x, method="attention", layer=0)
    tiny = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                               depths=(1, 1), num_heads=(1, 2), num_classes=10)
    with pytest.raises(ExplainError, match="rollout.*gradcam"):
        vitlab.explain(tiny, torch.randn(1, 3, 64, 64), method="rollout")


def test_models_without_attention_are_refused():
    model = vitlab.create_model("convnext_atto", num_classes=10, dims=(16, 32, 48, 64))
    with pytest.raises(ExplainError, match="no attention mixer.*gradcam"):
        vitlab.explain(model, torch.randn(1, 3, 32, 32), method="rollout")


def test_overlay_checks_shapes_and_cli_writes_picture(tmp_path):
    from PIL import Image

    from vitlab.cli import main

    model, x = _tiny_vit(), torch.rand(2, 1, 16, 16)
    e = vitlab.explain(model, x, method="rollout")
    with pytest.raises(ValueError, match="not \\(B, H, W\\)"):
        plot_explanations(x[:1], [e], tmp_path / "bad.png")
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(tmp_path / "img.png")
    out = tmp_path / "attn.png"
    assert main(["explain", "vl_test_vit", "--image", str(tmp_path / "img.png"), "--image",
                 str(tmp_path / "img.png"), "--method", "attention", "--layer", "0", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["explain", "vl_test_vit", "--image", str(tmp_path / "img.png"), "--method", "rollout",
                 "--head", "0", "--out", str(out)]) != 0                  # --head belongs to --method attention


@pytest.mark.slow
def test_real_photos_smoke(tmp_path):
    """Three real photos through every method on a timm ViT (random weights: this checks the plumbing and the
    pictures, /tmp/explain_smoke.png and /tmp/explain_smoke_sources.png, which a person looks at, not the
    explanations' quality)."""
    skimage_data = pytest.importorskip("skimage.data")
    import torch.nn.functional as F

    from vitlab.explain.tame import save_tame, train_tame
    from vitlab.explain.tokens import plot_token_sources, token_source_map

    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    photos = [torch.from_numpy(getattr(skimage_data, n)()).permute(2, 0, 1).float()[None] / 255
              for n in ("astronaut", "chelsea", "coffee")]
    images = torch.cat([F.interpolate(p, size=(224, 224), mode="bilinear") for p in photos])   # (3, 3, 224, 224)
    inputs = (images - 0.5) / 0.5
    # T-TAME needs an explainer trained for the model: a few steps on the photos themselves
    photos_set = torch.utils.data.TensorDataset(inputs, torch.zeros(3, dtype=torch.long))
    explainer = train_tame(model, photos_set, batch_size=3, max_steps=4, progress=False)
    tame_dir = save_tame(explainer, tmp_path / "tame")
    methods = [("attention", {}), ("rollout", {}), ("gradcam", {}), ("gradcam++", {}), ("layercam", {}),
               ("eigencam", {}), ("tame", {"tame": tame_dir})]
    explanations = [vitlab.explain(model, inputs, method=m, **options) for m, options in methods]
    for e, (method, _) in zip(explanations, methods):
        assert e.method == method and e.maps.shape == (3, 224, 224) and e.maps.isfinite().all()
        assert e.maps.amax() > e.maps.amin()                      # a map, not a constant
    out = plot_explanations(images, explanations, "/tmp/explain_smoke.png", titles=["astronaut", "chelsea", "coffee"])
    assert out.stat().st_size > 10_000
    # token sources: which patches ToMe merged into each final token, on the first photo
    reduced = vitlab.apply_(vitlab.create_model("vit_tiny_patch16_224", num_classes=10).eval(),
                           vitlab.parse_apply(["tome:r=8"]))
    labels = token_source_map(reduced, inputs[0])
    assert labels.shape == (14, 14) and len(labels.unique()) == 196 - 12 * 8
    out = plot_token_sources(images[0], labels, "/tmp/explain_smoke_sources.png", title="astronaut, ToMe r=8")
    assert out.stat().st_size > 10_000


def test_an_int8_graph_without_a_simulated_twin_is_refused_not_explained_as_float():
    """NNCF's w8a8 runs a graph vitlab has no twin of: explaining its float module would describe another model."""
    from types import SimpleNamespace

    from vitlab.explain.core import ExplainError, explained_module

    float_model = vitlab.create_model("vl_test_vit")
    nncf_like = SimpleNamespace(engine="openvino-int8", sim_module=None, module=float_model, float_module=float_model)
    with pytest.raises(ExplainError, match="no simulated twin"):
        explained_module(nncf_like)
    twin = vitlab.create_model("vl_test_vit")
    assert explained_module(SimpleNamespace(engine="openvino-int8", sim_module=twin, module=float_model)) is twin
    assert explained_module(vitlab.TorchRunner(float_model)) is float_model
