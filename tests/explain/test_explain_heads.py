"""Head analytics (vitlab.explain.heads): each number against an independent computation on a tiny case."""
import itertools
import math
import re

import pytest
import torch

import vitlab
from vitlab.explain import ExplainError
from vitlab.explain.heads import (analyze_heads, attention_entropy, head_mixers, mean_attention_distance,
                                  write_heads_html)

from seed_models import SEED_MODELS, input_shape


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_vit", num_classes=10).eval()     # 2 blocks, 1x16x16, 4x4 patches


def _brute_distance(probs: torch.Tensor, grid: tuple[int, int], prefix: int) -> list[float]:
    """Loops over images, heads, query and key patches: sum_k a d / sum_k a per query, mean over queries."""
    h, w = grid
    pos = [(i // w, i % w) for i in range(h * w)]
    out = []
    for head in range(probs.shape[1]):
        per_query = []
        for b in range(probs.shape[0]):
            for q in range(h * w):
                row = [float(probs[b, head, prefix + q, prefix + k]) for k in range(h * w)]
                dist = [math.dist(pos[q], pos[k]) for k in range(h * w)]
                per_query.append(sum(a * d for a, d in zip(row, dist)) / sum(row))
        out.append(sum(per_query) / len(per_query))
    return out


def test_uniform_attention_distance_and_entropy():
    probs = torch.full((2, 3, 5, 5), 1 / 5)                            # 1 prefix token + a 2x2 grid
    # from any patch of a 2x2 grid: distances 0, 1, 1, sqrt(2)
    assert mean_attention_distance(probs, (2, 2), 1).tolist() == pytest.approx([(2 + math.sqrt(2)) / 4] * 3)
    assert attention_entropy(probs).tolist() == pytest.approx([math.log(5)] * 3)
    self_only = torch.eye(5).expand(2, 3, 5, 5)
    assert mean_attention_distance(self_only, (2, 2), 1).tolist() == pytest.approx([0.0] * 3)
    assert attention_entropy(self_only).tolist() == pytest.approx([0.0] * 3, abs=1e-12)


def test_distance_matches_loops_on_random_attention():
    torch.manual_seed(1)
    probs = torch.randn(2, 2, 7, 7).softmax(-1)                        # 1 prefix + a 2x3 grid
    assert mean_attention_distance(probs, (2, 3), 1).tolist() == pytest.approx(_brute_distance(probs, (2, 3), 1))
    with pytest.raises(ValueError, match="2x2 query grid"):
        mean_attention_distance(probs, (2, 2), 1)


def test_uniform_attention_in_a_model():
    """q = k = 0 makes every attention row uniform: distance is the grid's mean pairwise distance, entropy log N."""
    model = _tiny_vit()
    for blk in model.blocks:
        dim = blk.attn.qkv.in_features
        with torch.no_grad():
            blk.attn.qkv.weight[:2 * dim] = 0
            blk.attn.qkv.bias[:2 * dim] = 0
    x, y = torch.randn(3, 1, 16, 16), torch.arange(3)
    report = analyze_heads(model, x, y)
    pairs = list(itertools.product(range(4), range(4)))
    expected = sum(math.dist(p, q) for p in pairs for q in pairs) / len(pairs) ** 2
    for layer in report.layers:
        assert layer.distance == pytest.approx([expected] * layer.num_heads, rel=1e-5)
        assert layer.entropy == pytest.approx([math.log(17)] * layer.num_heads, rel=1e-5)


def test_dead_head_is_unimportant_and_the_signal_head_most_important():
    """Constructed: MLPs and biases added to the residual off, class token and position embedding 0, every head's
    values zero except block 0's head 1, which alone carries the image to the class token; labels are the model's
    own (confident) predictions."""
    model = _tiny_vit()
    signal = (0, 1)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.mlp.fc2.weight.zero_(), blk.mlp.fc2.bias.zero_()
            attn, dim, hd = blk.attn, blk.attn.qkv.in_features, blk.attn.head_dim
            for h in range(attn.num_heads):
                if (i, h) != signal:                                    # a dead head: its v weights zero
                    attn.qkv.weight[2 * dim + h * hd:2 * dim + (h + 1) * hd] = 0
                    attn.qkv.bias[2 * dim + h * hd:2 * dim + (h + 1) * hd] = 0
            attn.proj.bias.zero_()
        model.cls_token.zero_(), model.pos_embed.zero_()                # the class token starts image-independent at 0
        model.head.weight *= 50                                         # confident: its own labels cost ~0
    torch.manual_seed(2)
    x = torch.randn(64, 1, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(-1)
    report = analyze_heads(model, x, y)
    loss = {(i, h): v for i, layer in enumerate(report.layers) for h, v in enumerate(layer.ablation_loss)}
    acc = {(i, h): v for i, layer in enumerate(report.layers) for h, v in enumerate(layer.ablation_acc_pt)}
    grad = {(i, h): v for i, layer in enumerate(report.layers) for h, v in enumerate(layer.gradient)}
    assert report.base_acc == 1.0
    for head in loss:
        if head != signal:
            assert abs(loss[head]) < 1e-6 and abs(acc[head]) < 1e-9 and grad[head] < 1e-6, head
    assert max(loss, key=loss.get) == signal and loss[signal] > 0.1
    assert max(grad, key=grad.get) == signal and acc[signal] > 20


@pytest.mark.parametrize("name", ["vl_test_vit", "swin_tiny_patch4_window7_224"])
def test_ablation_equals_zeroed_projection_columns(name):
    """The head gate (a hook on the projection's input) against zeroing the head's projection columns; Swin checks
    that a gate reaches all of an image's windows and no other image's."""
    torch.manual_seed(0)
    model = (_tiny_vit() if name == "vl_test_vit" else SEED_MODELS[name]()).eval()
    x = torch.randn(4, *(input_shape(name, model) if name != "vl_test_vit" else (1, 16, 16)))
    y = torch.tensor([0, 3, 5, 7])
    report = analyze_heads(model, x, y, batch_size=3)                 # a short last batch too
    mixers = head_mixers(model)
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(model(x), y)
        for i, m in enumerate(mixers):
            for h in range(m.num_heads):
                cols = m.proj.weight[:, h * m.head_dim:(h + 1) * m.head_dim]
                kept = cols.clone()
                cols.zero_()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                cols.copy_(kept)
                assert report.layers[i].ablation_loss[h] == pytest.approx(float(loss - base), abs=1e-5)
    assert report.base_loss == pytest.approx(float(base), rel=1e-5)
    assert all(not math.isnan(v) for layer in report.layers for v in layer.distance + layer.entropy)


def test_gradient_score_equals_finite_differences():
    """Michel et al.'s |dL/d gate| per image, against central differences of the loss in a scale on the head's
    projection columns, image by image, in float64."""
    model = _tiny_vit().double()
    torch.manual_seed(3)
    x, y = torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.tensor([1, 4, 9])
    report = analyze_heads(model, x, y)
    eps = 1e-5
    for i, m in enumerate(head_mixers(model)):
        for h in range(m.num_heads):
            cols = m.proj.weight[:, h * m.head_dim:(h + 1) * m.head_dim]
            kept = cols.detach().clone()
            losses = []
            with torch.no_grad():
                for scale in (1 + eps, 1 - eps):
                    cols.copy_(kept * scale)
                    losses.append(torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
                cols.copy_(kept)
            per_image = ((losses[0] - losses[1]).abs() / (2 * eps)).tolist()
            assert report.layers[i].gradient[h] == pytest.approx(sum(per_image) / len(x), rel=1e-5, abs=1e-9)


def test_refuses_a_model_without_attention_heads():
    model = SEED_MODELS["poolformer_s12"]().eval()
    with pytest.raises(ExplainError, match=r"(?s)MetaFormer.*pool.*gradcam"):
        analyze_heads(model, torch.randn(1, 3, 64, 64), torch.tensor([0]))


def test_page_is_self_contained_and_lists_every_head(tmp_path):
    model = _tiny_vit()
    report = analyze_heads(model, torch.randn(8, 1, 16, 16), torch.arange(8) % 10, name="vl_test_vit")
    page = write_heads_html(report, tmp_path / "heads.html").read_text()
    assert re.findall(r"<(?:script|img|link)[^>]*(?:src|href)=", page) == []   # nothing fetched
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert page.count("<tr><td") == sum(layer.num_heads for layer in report.layers) == 4
    assert page.count('class="heat"') == 5 and "vl_test_vit" in page
    assert list(tmp_path.iterdir()) == [tmp_path / "heads.html"]            # no temp file left behind


def test_cli_writes_the_page(tmp_path, capsys):
    from vitlab.cli import main

    out = tmp_path / "report.html"
    assert main(["heads", "vl_test_vit", "--data", "synthetic:n=16,classes=10", "--images", "12", "--out",
                 str(out)]) == 0
    text = out.read_text()
    assert "vitlab heads vl_test_vit --data" in text and "12: base loss" in text
    assert "4 heads in 2 layers, 12 images [val]" in capsys.readouterr().out
    assert main(["heads", "vl_test_vit", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["heads", "vl_test_vit", "--data", "synthetic:n=16,classes=10", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_cli_on_the_reference_checkpoint(tmp_path, capsys):
    from vitlab.cli import main

    out = tmp_path / "report.html"
    assert main(["heads", "checkpoints/fashion-mnist-reference", "--data", "fashion-mnist", "--images", "100",
                 "--out", str(out)]) == 0
    assert "12 heads in 4 layers, 100 images [val]" in capsys.readouterr().out
    assert out.read_text().count("<tr><td") == 12


def test_distance_to_a_pooled_key_grid_matches_loops():
    """Spatial-reduction attention (PVT): 4x4 queries, keys pooled 2x2 -> a 2x2 key grid whose cells sit at the
    centres of their patches ((0.5, 0.5), (0.5, 2.5), ...)."""
    torch.manual_seed(3)
    probs = torch.randn(2, 2, 16, 4).softmax(-1)
    keys = [(0.5, 0.5), (0.5, 2.5), (2.5, 0.5), (2.5, 2.5)]
    expected = []
    for head in range(2):
        rows = [sum(float(probs[b, head, q, k]) * math.dist((q // 4, q % 4), keys[k]) for k in range(4))
                for b in range(2) for q in range(16)]
        expected.append(sum(rows) / len(rows))
    assert mean_attention_distance(probs, (4, 4), 0, (2, 2)).tolist() == pytest.approx(expected)


def test_pvt_layers_get_a_distance():
    """PVT v2's spatial-reduction layers used to report NaN (keys on a coarser grid than the queries)."""
    torch.manual_seed(0)
    name = "pvt_v2_b0"
    model = SEED_MODELS[name]().eval()
    x = torch.randn(2, *input_shape(name, model))
    report = analyze_heads(model, x, torch.tensor([0, 1]))
    assert report.layers and all(not math.isnan(v) and v > 0 for layer in report.layers for v in layer.distance)
