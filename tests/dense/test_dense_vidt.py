"""ViDT (vitlab.dense.vidt): RAM on timm's Swin against the official code and timm, where the cross-attention runs,
the deformable decoder neck, ViDT without the neck, and the registered `vidt` head."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.swin_transformer import SwinTransformer

import vitlab.dense.vidt as vidt
from vitlab.dense.heads import HeadError, get_head
from vitlab.dense.vidt import SCENE_SWIN, RamSwin, ViDT, build_vidt, ram_block, sine_position_encoding
from vitlab.profiling.flops import count_flops

FIXTURE = Path(__file__).parents[1] / "fixtures" / "vidt"


def tiny_swin(**kwargs) -> SwinTransformer:
    """32 px, patch 2, window 2: stages of 16, 8, 4 tokens a side, shifted windows in every stage."""
    arch = dict(img_size=32, patch_size=2, in_chans=1, embed_dim=8, depths=(2, 2, 2), num_heads=(2, 2, 4),
                window_size=2, num_classes=0)
    return SwinTransformer(**dict(arch, **kwargs)).eval()


def official_to_vitlab(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official `SwinTransformer.finetune_det` names -> RamSwin names: a patch merging ends stage i officially and
    starts stage i + 1 in timm; per-block det_pos_linear moves beside the timm model."""
    state = {}
    for key, value in tensors.items():
        if not key.startswith("official."):
            continue
        key = key[len("official."):]
        parts = key.split(".")
        if key in ("det_token", "det_pos_embed"):
            state[key] = value
        elif "det_pos_linear" in key:
            state[f"det_pos_linear.{parts[1]}.{parts[3]}.{parts[-1]}"] = value
        elif ".downsample." in key:
            state[f"model.layers.{int(parts[1]) + 1}.downsample.{'.'.join(parts[3:])}"] = value
        else:
            state[f"model.{key}"] = value
    return state


@pytest.mark.parametrize("cross", ["last", "all"])
def test_ram_matches_official_code(cross):
    """RamSwin with the official weights reproduces naver-ai/vidt's Swin-with-RAM body, [PATCH] maps and [DET] tokens
    to float32 rounding, with cross-attention in the last stage and in every stage. The fixture was written on
    another CPU: the kernels (AVX-512, AMX) sum in other orders, so equal code differs by a few ulps (7.6e-6 seen)."""
    meta = json.loads((FIXTURE / "official_ram.json").read_text())
    tensors = load_file(str(FIXTURE / "official_ram.safetensors"))
    ram = RamSwin(tiny_swin(), det_tokens=meta["det_tokens"], pos_dim=meta["pos_dim"],
                  cross_stages=tuple(meta["cross"][cross])).eval()
    missing, unexpected = ram.load_state_dict(official_to_vitlab(tensors), strict=False)
    assert set(missing) == {"model.norm.weight", "model.norm.bias"} and not unexpected  # ViDT has no final norm
    with torch.no_grad():
        features, det, det_pos = ram(tensors["image"])
    for stage in (1, 2):
        torch.testing.assert_close(features[stage], tensors[f"{cross}.stage{stage}"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(det, tensors[f"{cross}.det"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(det_pos, tensors[f"{cross}.det_pos"])


def test_patch_stream_is_timm_swin_and_ignores_det_tokens():
    """With copied weights the [PATCH] stream equals timm's Swin stage by stage, in every stage even where the [DET]
    tokens cross-attend to the patches, and does not change when the [DET] tokens or their encodings change."""
    swin = tiny_swin()
    ram = RamSwin(copy.deepcopy(swin), det_tokens=5, pos_dim=16, cross_stages=(0, 1, 2)).eval()
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = swin.forward_intermediates(image, intermediates_only=True)
        features, det, _ = ram(image)
        for got, want in zip(features, expected, strict=True):
            assert torch.equal(got, want)
        torch.testing.assert_close(ram.model.norm(features[-1].permute(0, 2, 3, 1)), swin.forward_features(image))
        ram.det_token.normal_(0, 3.0)
        ram.det_pos_embed.normal_(0, 3.0)
        features2, det2, _ = ram(image)
    assert all(torch.equal(a, b) for a, b in zip(features, features2))
    assert not torch.allclose(det, det2)


def _cross_flags(monkeypatch, ram: RamSwin, image: torch.Tensor) -> list[list[bool]]:
    """Per stage, per block: did the block run [DET] x [PATCH; DET] cross-attention?"""
    flags = []

    def recording(block, x, det, det_pos, patch_pos=None):
        flags.append((block, patch_pos is not None))
        return ram_block(block, x, det, det_pos, patch_pos)

    monkeypatch.setattr(vidt, "ram_block", recording)
    with torch.no_grad():
        ram(image)
    by_block = dict(flags)
    return [[by_block[b] for b in stage.blocks] for stage in ram.model.layers]


def test_cross_attention_only_in_configured_stages(monkeypatch):
    image = torch.randn(1, 1, 32, 32)
    last = RamSwin(tiny_swin(), det_tokens=4, pos_dim=8).eval()
    assert _cross_flags(monkeypatch, last, image) == [[False, False], [False, False], [True, True]]
    every = RamSwin(tiny_swin(), det_tokens=4, pos_dim=8, cross_stages=(0, 1, 2)).eval()
    assert _cross_flags(monkeypatch, every, image) == [[True, True]] * 3
    with pytest.raises(ValueError, match="cross_stages"):
        RamSwin(tiny_swin(), cross_stages=(3,))


def test_det_tokens_see_the_image_only_through_cross_attention():
    """No cross-attention stage: the [DET] tokens are the same for any image; one stage: they differ."""
    swin = tiny_swin()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        _, det, _ = RamSwin(swin, det_tokens=4, pos_dim=8, cross_stages=()).eval()(images)
        assert torch.equal(det[0], det[1])
        _, det, _ = RamSwin(swin, det_tokens=4, pos_dim=8).eval()(images)
        assert not torch.allclose(det[0], det[1])


def test_ram_block_det_attention_against_hand_written_formula():
    """[DET] update of one block = official formula: qkv of the concatenated [patch + sine pos; det + det pos]
    (normalised), det queries x [patch; det] keys, softmax(q k^T / sqrt(d)) v, shared proj, residual, shared MLP."""
    torch.manual_seed(0)
    block = tiny_swin().layers[1].blocks[1]  # a shifted-window block, width 16, 2 heads
    x, det, det_pos = torch.randn(2, 8, 8, 16), torch.randn(2, 3, 16), torch.randn(1, 3, 16)
    patch_pos = sine_position_encoding(8, 8, 16)
    with torch.no_grad():
        _, got = ram_block(block, x, det, det_pos, patch_pos)
        _, alone = ram_block(block, x, det, det_pos)
        tokens = torch.cat([(block.norm1(x) + patch_pos).reshape(2, 64, 16), block.norm1(det) + det_pos], 1)
        q, k, v = block.attn.qkv(tokens).reshape(2, 67, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (B, nH, 67, d)
        weights = (q[:, :, 64:] @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)  # det queries x all 67 keys
        out = block.attn.proj((weights @ v).transpose(1, 2).reshape(2, 3, 16))
        want = det + out
        want = want + block.mlp(block.norm2(want))
        weights_det = (q[:, :, 64:] @ k[:, :, 64:].transpose(-2, -1) / 8 ** 0.5).softmax(-1)
        want_alone = det + block.attn.proj((weights_det @ v[:, :, 64:]).transpose(1, 2).reshape(2, 3, 16))
        want_alone = want_alone + block.mlp(block.norm2(want_alone))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, want_alone, atol=1e-5, rtol=1e-5)


def test_det_tokens_follow_patch_merging_width():
    """[DET] tokens are merged like patches (repeat x4, the merge's norm and reduction): width 8 -> 16 -> 32."""
    ram = RamSwin(tiny_swin(), det_tokens=4, pos_dim=8).eval()
    merging = ram.model.layers[1].downsample
    det = torch.randn(2, 4, 8)
    with torch.no_grad():
        want = merging(det[:, :, None, None, :].expand(-1, -1, 2, 2, -1).reshape(8, 2, 2, 8)).reshape(2, 4, 16)
        torch.testing.assert_close(vidt.merge_det_tokens(merging, det), want)
        assert ram(torch.randn(1, 1, 32, 32))[1].shape == (1, 4, 32)


def test_sine_position_encoding_halves():
    pos = sine_position_encoding(3, 5, 8)
    assert pos.shape == (1, 3, 5, 8)
    torch.testing.assert_close(pos[0, :, 0, :4], pos[0, :, 4, :4])  # y half constant along x
    torch.testing.assert_close(pos[0, 2, :, 4], torch.sin(torch.arange(1, 6) / (5 + 1e-6) * 2 * torch.pi))
    with pytest.raises(ValueError, match="multiple of 4"):
        sine_position_encoding(2, 2, 6)


@pytest.mark.parametrize("neck", [True, False])
def test_vidt_outputs_and_gradients(neck):
    torch.manual_seed(0)
    model = ViDT(RamSwin(tiny_swin(), det_tokens=6, pos_dim=32), num_classes=10, neck=neck, dim=32,
                 decoder_layers=2, heads=4, points=2, ffn_dim=64).train()
    if neck:  # the official init zeroes the box heads' last layers, which would stop their gradient at start
        for box in model.bbox_embed:
            torch.nn.init.normal_(box.layers[-1].weight, std=0.1)
    out = model(torch.randn(2, 1, 32, 32))
    assert out["pred_logits"].shape == (2, 6, 11) and out["pred_boxes"].shape == (2, 6, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux"]) == (3 - 1 if neck else 0)  # body + 2 decoding layers, the last one is the output
    loss = sum(o["pred_logits"].sum() + o["pred_boxes"].sum() for o in (out, *out["aux"]))
    loss.backward()
    unused = {"body.model.norm.weight", "body.model.norm.bias"}
    if not neck:  # only the [DET] tokens leave the body: the last block's window attention feeds nothing
        unused.add("body.model.layers.2.blocks.1.attn.relative_position_bias_table")
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert no_grad <= unused, no_grad - unused


def test_box_refinement_starts_at_reference_points():
    """At initialisation the box heads output zero: the body's prediction centres on the reference points
    (sigmoid of a linear map of the [DET] position encoding) with w = h = sigmoid(-2), as the official init; each
    decoding layer refines the previous prediction, so the boxes stay there."""
    model = ViDT(RamSwin(tiny_swin(), det_tokens=4, pos_dim=16), num_classes=3, dim=16, decoder_layers=2,
                 heads=2, points=2, ffn_dim=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
        reference = model.reference_points(model.query_pos_proj(model.body.det_pos_embed)).sigmoid()
    for prediction in (*out["aux"], out):
        torch.testing.assert_close(prediction["pred_boxes"][..., :2], reference.expand(2, -1, -1))
        torch.testing.assert_close(prediction["pred_boxes"][..., 2:], torch.full((2, 4, 2), torch.sigmoid(
            torch.tensor(-2.0)).item()))


def test_last_stage_cross_attention_costs_fewer_macs():
    image = torch.randn(1, 1, 32, 32)
    macs = {}
    for name, cross in (("last", (2,)), ("all", (0, 1, 2)), ("none", ())):
        model = ViDT(RamSwin(tiny_swin(), det_tokens=4, pos_dim=16, cross_stages=cross), num_classes=3, dim=16,
                     decoder_layers=1, heads=2, points=2, ffn_dim=32).eval()
        macs[name] = count_flops(model, image).macs
    assert macs["none"] < macs["last"] < macs["all"]


def test_registered_vidt_head_builds_a_scene_detector():
    entry = get_head("vidt", "detection")
    assert entry.wraps_model and {"neck", "cross_all_stages"} <= set(entry.options())
    model = entry.target("swin_tiny_patch4_window7_224", 10, det_tokens=5, decoder_layers=1).eval()
    assert model.body.model.patch_embed.proj.kernel_size == (SCENE_SWIN["patch_size"],) * 2
    assert model.body.cross_stages == (3,)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
    assert out["pred_logits"].shape == (1, 5, 11)
    assert build_vidt("swin_tiny_patch4_window7_224", 10, cross_all_stages=True).body.cross_stages == (0, 1, 2, 3)
    with pytest.raises(HeadError, match="supports timm SwinTransformer"):
        build_vidt("vl_test_vit", 10)
    with pytest.raises(HeadError, match="detection"):
        get_head("vidt", "panoptic")


def test_matched_box_loss_falls_on_a_fixed_batch():
    """ViDT trained on two fmnist-scenes canvases with the shared Hungarian `BoxCriterion` (body + decoder
    predictions, auxiliary losses included) fits them: the loss falls by more than half in 40 steps."""
    from vitlab.data.scenes import FmnistScenes, collate_scenes
    from vitlab.dense.engine import dense_loss
    from vitlab.dense.matching import BoxCriterion

    torch.manual_seed(0)
    images, targets = collate_scenes([FmnistScenes("train", n=2)[k] for k in range(2)])
    swin = tiny_swin(img_size=64, patch_size=4, embed_dim=16, num_heads=(2, 2, 4))
    model = ViDT(RamSwin(swin, det_tokens=8, pos_dim=32), num_classes=10, dim=32, decoder_layers=1, heads=4,
                 points=2, ffn_dim=64).train()
    criterion = BoxCriterion(10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = dense_loss(model(images), targets, criterion)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_vidt_trains_and_reloads_through_the_dense_engine(tmp_path):
    """`vitlab train --task detection --head vidt:... --init checkpoints/fashion-mnist-swin` in-process: the run
    scores AP on val and its checkpoint rebuilds with `vitlab.create_model`, giving the same boxes."""
    pytest.importorskip("pycocotools")
    import vitlab
    from vitlab.dense.engine import DenseTrainConfig, fit_dense

    init = Path(__file__).parents[2] / "checkpoints" / "fashion-mnist-swin"
    out = fit_dense(DenseTrainConfig(out=str(tmp_path / "run"), task="detection",
                                     head="vidt:neck=false,det_tokens=4", init=str(init),
                                     data="fmnist-scenes:n=8", steps=2, batch_size=4, threads=1, eval_images=4,
                                     progress=False))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["val_ap"] <= 1.0
    model = vitlab.create_model(str(out)).eval()
    assert isinstance(model, ViDT) and not model.neck and model.body.det_token.shape[1] == 4
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        again = vitlab.create_model(str(out)).eval()
        torch.testing.assert_close(model(image)["pred_boxes"], again(image)["pred_boxes"])
