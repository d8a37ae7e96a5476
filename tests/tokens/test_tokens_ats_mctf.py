"""ATS and MCTF (and EViT's official fixture): parity with the official code, ATS's sampling rule, per-image counts
with padding, schedules, explain."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import vitlab
from vitlab.profiling import count_flops
from vitlab.tokens import ATS, MCTF, EViT, token_schedule
from vitlab.tokens.ats import ats_sample, ats_scores

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tokens"
SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)


def _model(cls=VisionTransformer, **kw):
    torch.manual_seed(0)
    return cls(**{**SMALL, **kw}).eval()


@pytest.mark.parametrize("case", ["default", "one_way"])
def test_mctf_matches_the_official_implementation(case):
    """Fixture: mlvlab/MCTF's own model (eval, one-step-ahead, proportional attention) on the same weights/input."""
    meta = json.loads((FIXTURE / "official_mctf.json").read_text())["cases"][case]
    tensors = load_file(str(FIXTURE / "official_mctf.safetensors"))
    model = VisionTransformer(**meta["kwargs"]).eval()
    model.load_state_dict({k[len(case) + 1:]: v for k, v in tensors.items()
                           if k.startswith(case + ".") and "__" not in k})
    t = meta["mctf_type"]   # [r, r_teacher, trace, prop_attn, one_step_ahead, tau_sim, tau_info, tau_size, bidir, pool]
    vitlab.apply_(model, MCTF(r=t[0], prop_attn=bool(t[3]), tau_sim=t[5], tau_info=t[6], tau_size=t[7],
                              bidirection=bool(t[8]), trace_source=True))
    with torch.no_grad():
        logits = model(tensors[f"{case}.__input__"])
    torch.testing.assert_close(logits, tensors[f"{case}.__logits__"], atol=1e-5, rtol=1e-5)
    assert torch.equal(model.token_state.size, tensors[f"{case}.__size__"])
    assert torch.equal(model.token_state.source, tensors[f"{case}.__source__"])
    assert model.token_state.counts == token_schedule(model, MCTF(r=t[0]))


@pytest.mark.parametrize("case", ["fuse", "prune"])
def test_evit_matches_the_official_implementation(case):
    """Fixture: youweiliang/evit's own model (eval; keep rate at blocks 1, 2, 3 of 4) on the same weights/input."""
    meta = json.loads((FIXTURE / "official_evit.json").read_text())["cases"][case]
    tensors = load_file(str(FIXTURE / "official_evit.safetensors"))
    model = VisionTransformer(**meta["kwargs"]).eval()
    model.load_state_dict({k[len(case) + 1:]: v for k, v in tensors.items()
                           if k.startswith(case + ".") and "__" not in k})
    vitlab.apply_(model, EViT(keep_rate=meta["keep_rate"], fuse=meta["fuse"]))   # default locations: 1, 2, 3 of 4
    with torch.no_grad():
        logits = model(tensors[f"{case}.__input__"])
    torch.testing.assert_close(logits, tensors[f"{case}.__logits__"], atol=1e-5, rtol=1e-5)


def _official_ats_keep(scores: torch.Tensor, n_ref_tokens: int) -> torch.Tensor:
    """The official sampler (ats_block.py: score sort, normalized CDF, create_ys, nearest CDF value, unique indices)
    transcribed line by line for B images of N - 1 = n tokens; returns the kept-token mask (B, n)."""
    B, n = scores.shape
    sorted_scores, sorted_indices = torch.sort(scores, descending=False, dim=1)
    cdf = torch.cumsum(sorted_scores, dim=1)
    normalized_cdf = (cdf - cdf.min(dim=1)[0].unsqueeze(1)) / (
        (cdf.max(dim=1)[0] - cdf.min(dim=1)[0]) / 1.0).unsqueeze(1)
    ys = torch.linspace(0, 1.0, n_ref_tokens - 1).unsqueeze(0).repeat(B, 1)
    ys_start = torch.min(normalized_cdf + (normalized_cdf == 0).float() * 1e8, dim=1)[0].unsqueeze(-1).expand_as(ys)
    steps = torch.arange(0, n_ref_tokens - 1).unsqueeze(0).expand_as(ys_start)
    ys = (ys_start + (((ys * (n_ref_tokens - 2)) - ys_start * steps) / (n_ref_tokens - 2))).unsqueeze(2)
    normalized_cdf = normalized_cdf.unsqueeze(1)
    expanded_ys = torch.Tensor.expand(ys, (B, ys.shape[1], ys.shape[1]))
    diff_tokens = ys.shape[1] - n
    picked = torch.min(torch.abs(expanded_ys - F.pad(normalized_cdf, (diff_tokens, 0))), dim=2)[1] - diff_tokens
    keep = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        keep[b, sorted_indices[b, picked[b].unique()]] = True
    return keep


def test_ats_sampling_follows_the_official_rule():
    torch.manual_seed(0)
    scores = torch.rand(4, 48) ** 4                      # skewed, as class attention is
    scores[1, :40], scores[1, 40:] = 1e-4, 0.5 + torch.rand(8)   # one image with 8 dominant tokens
    scores = scores / scores.sum(1, keepdim=True)
    keep = ats_sample(scores, 48)
    assert torch.equal(keep, _official_ats_keep(scores, 49))
    counts = keep.sum(1)
    assert counts[1] < counts[0] and counts.max() < 48   # per-image counts; duplicates collapse
    assert keep[1, 40:].all()                            # the dominant tokens are always kept


def test_ats_sampling_on_hand_made_scores():
    scores = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]])
    # image 0: normalized CDF (0, 0, .5, 1); 4 samples from .5 to 1 (.5, .67, .83, 1) hit the two 0.5 tokens.
    # image 1: normalized CDF (0, .22, .56, 1); samples .22, .48, .74, 1 hit 0.2, 0.3, 0.3, 0.4: 0.1 is dropped
    # (the lowest token's CDF value is 0 and samples start at the smallest non-zero value)
    keep = ats_sample(scores, 4)
    assert keep.tolist() == [[False, False, True, True], [False, True, True, True]]
    v = torch.ones(1, 1, 3, 2)
    v[0, 0, 2] = 3.0                                     # token 2's value is 3x as long: 3x the score
    s = ats_scores(torch.tensor([[[0.5, 0.25, 0.25]]]), v, num_prefix=1)
    torch.testing.assert_close(s, torch.tensor([[0.25, 0.75]]))


@pytest.mark.parametrize("kw", [{}, {"class_token": False, "global_pool": "avg"}, {"init_values": 0.3}],
                         ids=["vit", "avgpool", "layerscale"])
def test_ats_padding_does_not_change_any_image(kw):
    """Per-image counts are padded to the batch maximum; each image's logits equal those of the image run alone."""
    model = _model(**kw)
    with torch.no_grad():   # sharper attention than random init gives, so that images keep different counts
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(8.0)
    vitlab.apply_(model, ATS(keep_rate=0.6, start=0.0))
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64)
    x[1] = 0.1 * x[1]
    with torch.no_grad():
        batch = model(x)
        counts = torch.stack(model.token_state.image_counts)          # (blocks, B)
        executed = list(model.token_state.counts)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert (counts != counts[:, :1]).any(), "the test needs images with different counts"
    assert executed == [model.num_prefix_tokens + int(c.max()) for c in counts]   # padding is executed
    assert all(n <= s for n, s in zip(executed, token_schedule(model, ATS(keep_rate=0.6, start=0.0))))
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_ats_executed_flops_fall_with_keep_rate():
    x = torch.randn(4, 3, 64, 64)
    macs = [count_flops(vitlab.apply_(_model(), ATS(keep_rate=k)), x).macs for k in (1.0, 0.7, 0.4)]
    assert macs[0] > macs[1] > macs[2]


@pytest.mark.parametrize("make", [
    lambda: _model(),
    lambda: _model(init_values=0.3),
    lambda: _model(VisionTransformerDistilled),
    lambda: _model(reg_tokens=2),
    lambda: _model(class_token=False, global_pool="avg"),
], ids=["vit", "layerscale", "distilled", "registers", "avgpool"])
@pytest.mark.parametrize("cfg", [ATS(start=1.0), MCTF(r=0)], ids=["ats-no-block", "mctf-r0"])
def test_no_op_settings_equal_the_untouched_model(make, cfg):
    model = make()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        vitlab.apply_(model, cfg)
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("make", [
    lambda: _model(VisionTransformerDistilled), lambda: _model(reg_tokens=2),
    lambda: _model(class_token=False, global_pool="avg"), lambda: vitlab.create_model("vl_vit_fmnist").eval(),
], ids=["distilled", "registers", "avgpool", "vl_vit_fmnist"])
def test_mctf_keeps_prefix_tokens_first_and_follows_the_schedule(make):
    model = vitlab.apply_(make(), MCTF(r=5, trace_source=True))
    c, s = (1, 28) if model.patch_embed.img_size[0] == 28 else (3, 64)
    with torch.no_grad():
        out = model(torch.randn(2, c, s, s))
    assert torch.isfinite(out).all()
    state, p = model.token_state, model.num_prefix_tokens
    assert state.counts == token_schedule(model, MCTF(r=5))
    assert torch.equal(state.source[:, :p, :p], torch.eye(p).expand(2, p, p))      # prefix tokens first, alone
    assert torch.equal(state.source.sum(1), torch.ones(2, state.source.shape[-1]))  # every input token once
    assert torch.equal(state.size[..., 0], state.source.sum(-1))


def test_explain_token_map_works_for_every_method(tmp_path):
    from PIL import Image

    from vitlab.cli import main
    from vitlab.explain import token_source_map

    image = tmp_path / "img.png"
    Image.fromarray((torch.rand(16, 16) * 255).to(torch.uint8).numpy()).save(image)
    for apply in ("ats:keep_rate=0.5,start=0", "mctf:r=3"):   # tome: test_tokens.py; evit: same code path
        out = tmp_path / f"{apply.split(':')[0]}.png"
        assert main(["explain", "vl_test_vit", "--image", str(image), "--tokens", "--apply", apply,
                     "--out", str(out)]) == 0
        assert out.read_bytes()[:4] == b"\x89PNG"
    labels = token_source_map(vitlab.apply_(vitlab.create_model("vl_test_vit"), ATS(keep_rate=0.5, start=0.0)),
                              torch.randn(1, 16, 16))
    assert labels.shape == (4, 4) and (labels == -1).any()             # dropped patches are marked
    labels = token_source_map(vitlab.apply_(vitlab.create_model("vl_test_vit"), MCTF(r=3)), torch.randn(1, 16, 16))
    assert (labels >= 0).all() and len(labels.unique()) < 16           # merged patches share a token


def test_bad_settings_are_errors_that_name_the_value():
    with pytest.raises(ValueError, match="keep_rate must be in"):
        ATS(keep_rate=0.0)
    with pytest.raises(ValueError, match="r must be >= 0"):
        MCTF(r=-1)
