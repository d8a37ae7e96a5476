"""grad-CAM family (vitlab.explain.gradcam): parity with pytorch-grad-cam called directly, token-reduced scatter
against a hand-written formula, and every kind of model an explanation must handle (plain, hierarchical,
token-reduced, pruned, int8-simulated)."""
import numpy as np
import pytest
import pytorch_grad_cam
import torch
import torch.nn as nn
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import vitlab
from vitlab.explain import ExplainError
from vitlab.explain.gradcam import CAM_METHODS, cam_saliency, patch_grid

from seed_models import build, input_shape


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_vit", num_classes=10).eval()   # 1x16x16, patch 4: a 4x4 grid, class token


def _images(shape=(1, 16, 16), batch=2) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_matches_pytorch_grad_cam_called_directly(method):
    model, x = _vit(), _images()
    target = torch.tensor([3, 7])

    def reshape(t):                      # (B, 17, C): drop the class token, fold the 16 patches into 4x4
        return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[-1]).permute(0, 3, 1, 2)

    cam = getattr(pytorch_grad_cam, CAM_METHODS[method])(model, [model.blocks[-1].norm1], reshape_transform=reshape)
    expected = torch.from_numpy(cam(x, [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]))
    cam.activations_and_grads.release()
    ours, extras = cam_saliency(model, x, target, method)
    assert extras["layer"] == "blocks.1.norm1"
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    explained = vitlab.explain(model, x, method=method, target=target)
    torch.testing.assert_close(explained.maps, expected, rtol=0, atol=1e-5)   # re-scaled to [0, 1] by explain
    assert all(p.grad is None for p in model.parameters())


def test_map_follows_the_target_class():
    model, x = _vit(), _images()
    a = vitlab.explain(model, x, method="gradcam", target=0).maps
    b = vitlab.explain(model, x, method="gradcam", target=1).maps
    assert (a - b).abs().amax() > 0.1


def test_token_reduced_cam_is_each_tokens_value_on_its_patches():
    """ToMe: grad-CAM by hand on the merged tokens (weights = size-weighted mean gradient over patches), spread to
    the patches through the source matrix, equals what the method returns."""
    model, x = _vit(), _images()
    x = x.repeat(2, 1, 1, 1)  # 4 images
    model = vitlab.apply_(model, vitlab.parse_apply(["tome:r=3"]))
    target = torch.tensor([1, 2, 3, 4])
    ours, _ = cam_saliency(model, x, target, "gradcam")

    seen = {}
    state = model.token_state

    def hook(module, inputs, output):
        output.retain_grad()
        seen.update(a=output, source=state.source.clone())

    handle = model.blocks[-1].norm1.register_forward_hook(hook)
    state.trace_source = True
    try:
        logits = model(x)
    finally:
        state.trace_source = False
        handle.remove()
    logits.gather(1, target[:, None]).sum().backward()
    A, G = seen["a"].detach(), seen["a"].grad                  # (B, N', C) merged tokens
    S = seen["source"][:, :, 1:]                               # (B, N', 16) patches per token, class token left out
    assert A.shape[1] < 17                                     # tokens were merged before the last block
    weights = (S.sum(2, keepdim=True) * G).sum(1) / 16         # (B, C) mean gradient over the 16 patches
    token_cam = (A * weights[:, None]).sum(-1).clamp(min=0)    # (B, N')
    patch_cam = (S.transpose(1, 2) @ token_cam[..., None])[..., 0].reshape(4, 4, 4)   # (B, 4, 4)
    # as pytorch-grad-cam does: scale to [0, 1] and resize per layer, then scale the mean over layers again
    expected = torch.from_numpy(scale_cam_image(scale_cam_image(patch_cam.numpy(), (16, 16))))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert model.token_state.trace_source is False


def test_token_reduction_at_its_no_op_setting_changes_nothing():
    x, target = _images(), torch.tensor([2, 5])
    base, _ = cam_saliency(_vit(), x, target, "gradcam")
    for spec in ("tome:r=0", "evit:keep_rate=1.0"):
        reduced = vitlab.apply_(_vit(), vitlab.parse_apply([spec]))
        torch.testing.assert_close(cam_saliency(reduced, x, target, "gradcam")[0], base, rtol=0, atol=1e-6)


def _variant(spec: str) -> tuple[nn.Module, torch.Tensor]:
    model, x = _vit(), _images()
    return vitlab.apply_(model, vitlab.parse_apply([spec]), calib=[x]), x


def _seed(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build(name)
    return model, _images(input_shape(name, model))


CASES = {
    "vl_test_vit": lambda: (_vit(), _images()),
    "vit+registers": lambda: _seed("vit_tiny_patch16_224"),           # 3 prefix tokens (class + 2 registers)
    "swin": lambda: _seed("swin_tiny_patch4_window7_224"),            # nhwc blocks
    "pvt_v2": lambda: _seed("pvt_v2_b0"),                             # sequence blocks over a 2x2 stage grid
    "convnext": lambda: _seed("convnext_atto"),                       # nchw blocks without norm1
    "tome": lambda: _variant("tome:r=2"),
    "evit": lambda: _variant("evit:keep_rate=0.5"),                   # dropped patches without fusion
    "pruned": lambda: _variant("prune:target_flops=0.8"),
    "ptq": lambda: _variant("ptq"),
}
# blocks without prefix tokens are read at their output, those with a class token at their first norm
LAYER = {"swin": "layers.1.blocks.0", "pvt_v2": "stages.3.blocks.0", "convnext": "stages.3.blocks.1"}


@pytest.mark.parametrize("case", list(CASES))
def test_explains_every_kind_of_model(case):
    model, x = CASES[case]()
    for method in ("gradcam", "eigencam"):
        e = vitlab.explain(model, x, method=method)
        assert e.maps.shape == (len(x), *x.shape[-2:]) and torch.isfinite(e.maps).all()
        assert e.extras["layer"] == LAYER.get(case, "blocks.1.norm1")
        spread = e.maps.flatten(1).amax(1) - e.maps.flatten(1).amin(1)         # (B,) 1 where a map has structure
        # grad-CAM: a gradient reached the layer (through fake-quant too); a random-init model may still give an
        # image whose weighted activations are negative everywhere (all zero after the ReLU)
        assert spread.amax() > 0.99 if method == "gradcam" else (spread > 0.99).all(), (case, method, spread)


def test_ptq_gradient_passes_through_fake_quant():
    model, x = _variant("ptq")
    assert any("Quant" in type(m).__name__ for m in model.modules())
    seen = {}
    model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: seen.update(a=o) or o.retain_grad())
    model(x)[:, 0].sum().backward()
    assert seen["a"].grad[:, 1:].abs().sum() > 0


def test_layer_option_and_errors():
    model, x = _vit(), _images()
    assert vitlab.explain(model, x, method="gradcam", layer=0).extras["layer"] == "blocks.0.norm1"
    assert vitlab.explain(model, x, method="layercam", layer="blocks.0").extras["layer"] == "blocks.0.norm1"
    with pytest.raises(ExplainError, match="layer=5 is out of range .* 2 blocks"):
        vitlab.explain(model, x, method="gradcam", layer=5)
    with pytest.raises(ExplainError, match="blocks.0, blocks.1"):
        vitlab.explain(model, x, method="gradcam", layer="head")
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    with pytest.raises(ExplainError, match="--method gradcam does not apply to Sequential: no model-contract adapter"):
        vitlab.explain(plain, x, method="gradcam")
    vir, x = _seed("vl_test_vir")                              # retention: its class token is the LAST token
    with pytest.raises(ExplainError, match="65 tokens after the 0 prefix tokens .* form no grid over a 32x32"):
        vitlab.explain(vir, x, method="gradcam")


def test_patch_grid_follows_the_image_aspect():
    assert patch_grid(49, 28, 28) == (7, 7)
    assert patch_grid(98, 28, 56) == (7, 14)
    assert patch_grid(98, 56, 28) == (14, 7)
    assert patch_grid(7, 16, 16) is None                       # 1x7 is no grid over a square image


def test_reference_checkpoint():
    model = vitlab.create_model("checkpoints/fashion-mnist-reference").eval()   # 1x28x28, hybrid stem: 7x7 grid
    x = _images((1, 28, 28), batch=1)
    e = vitlab.explain(model, x, method="gradcam")
    assert e.maps.shape == (1, 28, 28) and e.extras["layer"] == "blocks.3.norm1"
    assert np.isclose(float(e.maps.amax()), 1.0, atol=1e-5)


def test_cli_explains_a_calibrated_stack_given_data_and_refuses_it_without(tmp_path, capsys):
    # `--apply ptq` calibrates: explain takes its images from --data (a seeded train subset), else one line says so
    from PIL import Image

    from vitlab.cli import main

    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(tmp_path / "img.png")
    out = tmp_path / "cam.png"
    base = ["explain", "vl_test_vit", "--image", str(tmp_path / "img.png"), "--method", "gradcam", "--layer", "1",
            "--apply", "ptq", "--out", str(out)]
    assert main(base) == 2 and not out.exists()
    assert "--data SPEC" in capsys.readouterr().err
    assert main(base + ["--data", "synthetic:n=16", "--calib-images", "8"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
