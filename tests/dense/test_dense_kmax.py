"""kMaX-DeepLab's k-means cross-attention (vitlab/dense/kmax.py): the update against scipy, Lloyd's k-means,
no gradient through the argmax, zero-gamma residuals, parity with the official layer, the registered heads."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitlab.dense import get_head, parse_head
from vitlab.dense.kmax import (BottleneckBlock, KMaXDecoder, KMaXLayer, KMeansCrossAttention, ResizedFuse,
                               SoftmaxXAttnDecoder, cluster_update, kmeans_assignment)
from vitlab.errors import UserError

scipy_ndimage = pytest.importorskip("scipy.ndimage")
scipy_vq = pytest.importorskip("scipy.cluster.vq")

FIXTURE = Path(__file__).parents[1] / "fixtures" / "kmax"


def test_cluster_update_equals_scipy_sum_labels():
    """Each centre's update is the sum of its assigned pixels' values (scipy.ndimage.sum_labels over the argmax)."""
    g = torch.Generator().manual_seed(0)
    logits, values = torch.randn(2, 5, 60, generator=g), torch.randn(2, 3, 60, generator=g)
    update = cluster_update(kmeans_assignment(logits), values)  # (B, D, Q)
    labels = logits.argmax(dim=1).numpy()  # (B, N)
    for b in range(2):
        for d in range(3):
            expected = scipy_ndimage.sum_labels(values[b, d].numpy(), labels=labels[b], index=np.arange(5))
            np.testing.assert_allclose(update[b, d].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_kmeans_cross_attention_module_adds_the_sum_labels_update():
    """The module's residual update, with the BN/conv made identities, is the scipy sum over assigned pixels."""
    torch.manual_seed(0)
    module = KMeansCrossAttention(value_dim=4, query_dim=4).eval()  # eval: BN uses running stats (0, 1)
    with torch.no_grad():
        module.proj[0].weight.copy_(torch.eye(4)[:, :, None])
        module.proj[1].weight.fill_(1.0)
    centres, logits, values = torch.randn(1, 4, 3), torch.randn(1, 3, 40), torch.randn(1, 4, 40)
    out = module(centres, logits, values)
    labels = logits.argmax(dim=1)[0].numpy()
    expected = np.stack([scipy_ndimage.sum_labels(values[0, d].numpy(), labels=labels, index=np.arange(3))
                         for d in range(4)])
    scale = (1 + 1e-3) ** -1.0  # two BNs with running var 1 and eps 1e-3, each dividing by sqrt(1 + eps)
    np.testing.assert_allclose((out - centres)[0].detach().numpy(), expected * scale, rtol=1e-5, atol=1e-5)


def test_stacked_mean_update_layers_equal_lloyds_kmeans():
    """Identity projections, no BN/residual, a mean update: L stacked k-means cross-attention steps are L Lloyd
    iterations (scipy kmeans2, minit="matrix"). The logits are dot products of pixels [x, 1] with the centre kernel
    [2c, -|c|^2], whose argmax is the nearest centre."""
    rng = np.random.default_rng(0)
    blobs = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    data = np.concatenate([b + rng.normal(size=(50, 2)) for b in blobs])  # (N, 2)
    init = data[rng.choice(len(data), 4, replace=False)]  # (Q, 2)
    for iters in (1, 3, 6):
        expected, expected_labels = scipy_vq.kmeans2(data, init.copy(), iter=iters, minit="matrix")
        pixels = torch.from_numpy(data).T[None]  # (1, D, N)
        centres = torch.from_numpy(init).T[None]  # (1, D, Q)
        augmented = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)  # (1, D+1, N)
        for _ in range(iters):
            kernel = torch.cat([2 * centres, -(centres ** 2).sum(1, keepdim=True)], dim=1)  # (1, D+1, Q)
            assignment = kmeans_assignment(torch.einsum("bdn,bdq->bqn", augmented, kernel))
            assert bool((assignment.sum(-1) > 0).all()), "an empty cluster: pick another seed"
            centres = cluster_update(assignment, pixels, mean=True)
        np.testing.assert_allclose(centres[0].T.numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(assignment[0].argmax(0).numpy(), expected_labels)


def test_no_gradient_through_the_argmax():
    """The assignment carries no gradient: the values get one, the logits none."""
    logits = torch.randn(2, 4, 30, requires_grad=True)
    values = torch.randn(2, 3, 30, requires_grad=True)
    assignment = kmeans_assignment(logits)
    assert not assignment.requires_grad and assignment.grad_fn is None
    cluster_update(assignment, values).square().sum().backward()
    assert logits.grad is None
    assert values.grad is not None and values.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["kmeans", "softmax"])
def test_layer_gradients_reach_centres_through_values_not_through_the_assignment(attention):
    """A loss on a layer's output centres reaches the input centres and the pixel values; under k-means the mask
    predictor (which only gives the assignment, besides the auxiliary outputs) gets no gradient, while softmax
    cross-attention sends one into its query/key projections."""
    torch.manual_seed(0)
    layer = KMaXLayer(pixel_in=8, query_dim=16, num_classes=5, attention=attention, base=8, heads=2, ffn=16,
                      mask_dim=8)
    with torch.no_grad():  # switch the zero-gamma residual of the cross-attention on
        layer.cross.proj[1].weight.fill_(1.0)
    centres = torch.randn(2, 16, 6, requires_grad=True)
    out, _ = layer(torch.randn(2, 8, 5, 5), centres)
    out.square().sum().backward()
    assert centres.grad is not None and centres.grad.abs().sum() > 0
    assert layer.pixel_v[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.predictor.parameters())
    if attention == "softmax":
        assert layer.cross.q[0].weight.grad.abs().sum() > 0 and layer.cross.k[0].weight.grad.abs().sum() > 0


def test_zero_gamma_residuals_at_init():
    """At init the k-means update adds nothing (gamma 0), and a whole layer is gelu(gelu(x)): its three residual
    branches are zero and the official layer applies GELU after self-attention and after the FFN."""
    torch.manual_seed(0)
    module = KMeansCrossAttention(value_dim=8, query_dim=6)
    centres = torch.randn(2, 6, 5)
    torch.testing.assert_close(module(centres, torch.randn(2, 5, 20), torch.randn(2, 8, 20)), centres,
                               rtol=0, atol=0)
    layer = KMaXLayer(pixel_in=8, query_dim=16, num_classes=5, base=8, heads=2, ffn=16, mask_dim=8)
    centres = torch.randn(2, 16, 6)
    out, _ = layer(torch.randn(2, 8, 5, 5), centres)
    torch.testing.assert_close(out, F.gelu(F.gelu(centres)), rtol=0, atol=0)


def _official_to_ours(sd: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename an official state dict: module prefixes by `names`, `ConvBN`'s `.conv.` / `.norm.` to `.0.` / `.1.`."""
    out = {}
    for key, value in sd.items():
        prefix = max((p for p in names if key.startswith(p + ".")), key=len)
        rest = key[len(prefix) + 1:].replace("conv.", "0.").replace("norm.", "1.")
        out[f"{names[prefix]}.{rest}"] = value
    return out


def _load(module: torch.nn.Module, tensors: dict[str, torch.Tensor], tag: str, names: dict[str, str]) -> None:
    sd = {k[len(tag) + 4:]: v for k, v in tensors.items() if k.startswith(tag + ".sd.")}
    missing, unexpected = module.load_state_dict(_official_to_ours(sd, names), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)


def test_layer_equals_official_kmax_transformer_layer():
    """Official kMaXTransformerLayer (bytedance/kmax-deeplab, commit in the json), same weights, training mode."""
    from safetensors.torch import load_file

    meta = json.loads((FIXTURE / "official_kmax.json").read_text())
    tensors = load_file(str(FIXTURE / "official_kmax.safetensors"))
    cfg = meta["layer"]
    layer = KMaXLayer(cfg["in_channel_pixel"], cfg["in_channel_query"], cfg["num_classes"] - 1,
                      base=cfg["base_filters"], heads=cfg["num_heads"], ffn=2048, mask_dim=128).train()
    _load(layer, tensors, "layer", {
        "_pixel_conv1_bn_act": "pixel_in", "_query_conv1_bn_act": "query_in", "_pixel_v_conv_bn": "pixel_v",
        "_predcitor._pixel_space_head_conv0bnact": "predictor.pixel_head.0",
        "_predcitor._pixel_space_head_conv1bnact": "predictor.pixel_head.1",
        "_predcitor._pixel_space_head_last_convbn": "predictor.pixel_head.2",
        "_predcitor._transformer_mask_head": "predictor.mask_head",
        "_predcitor._transformer_class_head": "predictor.class_head",
        "_predcitor._pixel_space_mask_batch_norm": "predictor.mask_norm",
        "_kmeans_query_batch_norm_retrieved_value": "cross.norm", "_kmeans_query_conv3_bn": "cross.proj",
        "_query_qkv_conv_bn": "qkv", "_query_self_attention._batch_norm_similarity": "self_attn.norm_similarity",
        "_query_self_attention._batch_norm_retrieved_value": "self_attn.norm_value", "_query_conv3_bn": "self_proj",
        "_query_ffn_conv1_bn_act": "ffn.0", "_query_ffn_conv2_bn": "ffn.1"})
    centres, (class_logits, mask_logits, _) = layer(tensors["layer.in.pixels"], tensors["layer.in.centres"])
    torch.testing.assert_close(class_logits, tensors["layer.out.class_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mask_logits, tensors["layer.out.mask_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(centres, tensors["layer.out.centres"], rtol=1e-4, atol=1e-5)


def test_pixel_decoder_blocks_equal_official():
    """The bottleneck `SingleBlock` and `ResizedFuse` of the official pixel decoder, same weights, training mode."""
    from safetensors.torch import load_file

    tensors = load_file(str(FIXTURE / "official_kmax.safetensors"))
    block, fuse = BottleneckBlock(16, 8).train(), ResizedFuse(32, 12, 8).train()
    _load(block, tensors, "block", {"_conv1_bn_act": "convs.0", "_conv2_bn_act": "convs.1", "_conv3_bn": "convs.2",
                                    "_shortcut": "shortcut"})
    _load(fuse, tensors, "fuse", {"_conv_bn_low": "low", "_conv_bn_high": "high"})
    out = block(tensors["block.in.low"])
    torch.testing.assert_close(out, tensors["block.out.block"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fuse(out, tensors["block.in.high"]), tensors["block.out.fuse"], rtol=1e-4, atol=1e-5)


def _features() -> list[torch.Tensor]:
    return [torch.randn(2, 24, 16, 16), torch.randn(2, 32, 8, 8), torch.randn(2, 48, 4, 4)]  # strides 4, 8, 16


@pytest.mark.parametrize("name", ["kmax", "softmax-xattn"])
def test_registered_heads_output_and_gradients(name):
    entry = get_head(name, "panoptic")
    assert get_head(name, "semantic") is entry
    torch.manual_seed(0)
    head = entry.target([24, 32, 48], [4, 8, 16], num_classes=11, layers_per_stage=2)
    out = head(_features(), torch.randn(2, 1, 64, 64))
    assert out["pred_logits"].shape == (2, 16, 12) and out["pred_masks"].shape == (2, 16, 16, 16)
    assert len(out["aux"]) == 6
    assert all(a["pred_logits"].shape == (2, 16, 12) and a["pred_masks"].shape == (2, 16, 16, 16) for a in out["aux"])
    # every centre starts out predicting "no object" (official add_bias_towards_void, prior 0.9)
    assert bool((out["pred_logits"].softmax(-1)[..., -1] > 0.5).all())
    loss = out["pred_logits"].square().mean() + out["pred_masks"].square().mean()
    loss = loss + sum(a["pred_masks"].square().mean() + a["pred_logits"].square().mean() for a in out["aux"])
    loss.backward()
    assert head.centres.grad is not None and head.centres.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_softmax_baseline_is_the_same_decoder_with_softmax_attention():
    kmax, soft = KMaXDecoder([24, 32, 48], [4, 8, 16], 11), SoftmaxXAttnDecoder([24, 32, 48], [4, 8, 16], 11)
    assert soft.attention == "softmax" and kmax.attention == "kmeans"
    extra = {n for n, _ in soft.named_parameters()} - {n for n, _ in kmax.named_parameters()}
    assert extra and all(".cross.q." in n or ".cross.k." in n for n in extra)
    ratio = sum(p.numel() for p in soft.parameters()) / sum(p.numel() for p in kmax.parameters())
    assert 1.0 < ratio < 1.1


def test_head_options_parse_and_bad_values_refuse():
    entry, options = parse_head("kmax:attention=softmax,num_queries=8,dim=64", "panoptic")
    head = entry.target([24, 32, 48], [4, 8, 16], 11, **options)
    assert head.attention == "softmax" and head.centres.shape == (64, 8)
    with pytest.raises(UserError, match="attention='dot'.*kmeans, softmax"):
        KMaXDecoder([24, 32, 48], [4, 8, 16], 11, attention="dot")
    with pytest.raises(UserError, match="num_queries=0"):
        KMaXDecoder([24, 32, 48], [4, 8, 16], 11, num_queries=0)
    with pytest.raises(UserError, match="at least two feature levels"):
        KMaXDecoder([24], [16], 11)
    with pytest.raises(UserError, match="detection"):
        get_head("kmax", "detection")


def test_docstring_example_runs():
    import doctest

    import vitlab.dense.kmax as kmax

    torch.manual_seed(0)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(kmax.KMaXDecoder, "KMaXDecoder", globs={"torch": torch, "KMaXDecoder": KMaXDecoder}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted == 3 and runner.summarize(verbose=False).failed == 0


# ---------------------------------------------------------------------------------------------------------------------
# kMaX-DeepLab's own losses (vitlab/dense/kmax_loss.py)

def _official_loss_case():
    from safetensors.torch import load_file

    tensors = load_file(str(FIXTURE / "official_kmax_loss.safetensors"))
    meta = json.loads((FIXTURE / "official_kmax_loss.json").read_text())
    inputs = {k: v.clone().requires_grad_(True) for k, v in tensors.items()
              if not k.startswith(("target", "bg_", "void_"))}
    outputs = {k: inputs[k] for k in ("pred_logits", "pred_masks", "pixel_feature", "aux_semantic_pred")}
    outputs["aux"] = [{k: inputs[f"aux0_{k}"] for k in ("pred_logits", "pred_masks", "pixel_feature")}]
    targets = [{"labels": tensors[f"target{b}_labels"], "masks": tensors[f"target{b}_masks"],
                "semantic": tensors[f"target{b}_semantic"]} for b in range(2)]
    return tensors, meta, inputs, outputs, targets


@pytest.mark.parametrize("case", ["bg", "void"])
def test_kmax_criterion_equals_official_set_criterion(case):
    """Every weighted term and the gradients equal bytedance/kmax-deeplab's SetCriterion + HungarianMatcher on the
    fixture (case "void": the targets leave the background pixels unlabelled)."""
    from vitlab.dense.kmax_loss import KMaXCriterion

    tensors, meta, inputs, outputs, targets = _official_loss_case()
    criterion = KMaXCriterion(meta["num_classes"], "panoptic", background=-1 if case == "bg" else None, sample_k=64)
    losses = criterion(outputs, targets)
    expected = meta["cases"][case]
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    sum(losses.values()).backward()
    for key in ("pred_logits", "pred_masks", "pixel_feature", "aux0_pred_masks"):
        torch.testing.assert_close(inputs[key].grad, tensors[f"{case}_grad_{key}"], rtol=1e-4, atol=1e-6)


def test_kmax_loss_terms_by_hand():
    """The mask-ID cross-entropy, dice and matching on a 1-image, 2-query, 3-pixel case computed by hand."""
    from vitlab.dense.kmax_loss import kmax_match, mask_id_cross_entropy, softmax_dice

    masks = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]]])  # (B=1, Q=2, P=3)
    target = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])
    void = torch.zeros(1, 3, dtype=torch.bool)
    p = masks.softmax(1)[0]  # (Q, P)
    ce = -(torch.log(p[0, 0]) + torch.log(p[1, 1]) + torch.log(p[1, 2])) / 3  # one-hot CE per pixel, mean
    assert mask_id_cross_entropy(masks, target, void).item() == pytest.approx(ce.item(), rel=1e-6)
    weight = torch.tensor([[0.5, 1.0]])
    dice0 = 1 - (2 * p[0, 0] + 1) / (p[0].sum() + 1 + 1)
    dice1 = 1 - (2 * (p[1, 1] + p[1, 2]) + 1) / (p[1].sum() + 2 + 1)
    expected = (0.5 * dice0 + 1.0 * dice1) * 0.75 / 2
    assert softmax_dice(masks, target, void, weight).item() == pytest.approx(expected.item(), rel=1e-6)
    logits = torch.tensor([[0.0, 3.0, 0.0], [3.0, 0.0, 0.0]])  # (Q, K + 1): query 0 says class 1, query 1 class 0
    (rows, cols), dice, prob = kmax_match(logits, masks[0], torch.tensor([1, 0]), target[0])
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]  # query 0 <-> segment 0 (class 1) and 1 <-> 1
    assert dice[0].item() == pytest.approx((p[0, 0] / ((p[0].sum() + 1) / 2 + 1e-5)).item(), rel=1e-5)
    assert prob[0].item() == pytest.approx(logits[0].softmax(0)[1].item(), rel=1e-6)


def test_kmax_loss_head_trains_and_infers_softmax_masks():
    """`loss=kmax`: training outputs carry what the criterion reads and it backpropagates to the aux semantic head;
    in eval, sigmoid(pred_masks) is the softmax over queries (what the shared sigmoid inference reads)."""
    torch.manual_seed(0)
    head = KMaXDecoder([16, 16, 16], [4, 8, 16], num_classes=3, dim=32, num_queries=4, heads=2, loss="kmax")
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)]
    out = head(feats, None)
    assert out["pixel_feature"].shape[-2:] == out["pred_masks"].shape[-2:] == (8, 8)
    assert out["aux_semantic_pred"].shape == (2, 3, 2, 2) and all("pixel_feature" in a for a in out["aux"])
    semantic = torch.full((32, 32), 2, dtype=torch.long)
    semantic[4:20, 4:20] = 0
    target = {"labels": torch.tensor([0]), "masks": (semantic == 0)[None], "semantic": semantic}
    loss = sum(head.criterion("panoptic")(out, [target, target]).values())
    loss.backward()
    assert head.aux_semantic[2][0].weight.grad.abs().sum() > 0
    head.eval()
    with torch.no_grad():
        probs = head(feats, None)["pred_masks"].sigmoid()
        head.loss = "m2f"  # the same weights' raw mask logits
        raw = head(feats, None)["pred_masks"]
    torch.testing.assert_close(probs, raw.softmax(1), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="loss=kmax"):
        KMaXDecoder([16, 16, 16], [4, 8, 16], num_classes=3, loss="focal")


def test_training_with_loss_kmax_uses_kmax_deeplabs_criterion(tmp_path, monkeypatch):
    """`vitlab train --head kmax:loss=kmax` trains with KMaXCriterion, not Mask2Former's (the engine picks the
    criterion from the head's training outputs)."""
    from vitlab.cli import main
    from vitlab.dense import kmax_loss

    calls, real = [], kmax_loss.KMaXCriterion.forward
    monkeypatch.setattr(kmax_loss.KMaXCriterion, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert main(["train", "--task", "panoptic", "--head", "kmax:loss=kmax", "--model", "vl_test_vit", "--data",
                 "fmnist-scenes:n=16", "--steps", "2", "--batch-size", "4", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    assert len(calls) == 2
