"""Sparsifiner (vitlab.tokens.sparsifiner): dense at keep_rate=1, top-k mask structure, FLOPs by hand, the
distillation loss, refusal, save/load."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.checkpoint import save_checkpoint
from vitlab.profiling import count_flops
from vitlab.techniques import TechniqueError, TechniqueNotApplicable, parse_apply
from vitlab.tokens.sparsifiner import (ConnectivityDistill, ConnectivityPredictor, SparsifinerRecipe,
                                       predictor_macs, sparse_attention_macs, sparsifiner_flops,
                                       topk_connectivity)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return vitlab.create_model("vl_test_vit", num_classes=5).eval()   # 16 patches + class token, 2 heads of 16


def _sparse(text: str = "sparsifiner:keep_rate=0.25", seed: int = 0):
    return vitlab.apply_(_model(seed), parse_apply([text]))


def test_keep_all_is_dense_attention():
    x = torch.randn(3, 1, 16, 16)
    base = _model()
    with torch.no_grad():
        ref = base(x)
        out = _sparse("sparsifiner:keep_rate=1.0")(x)
    assert (out - ref).abs().max() < 1e-6


def test_topk_mask_structure():
    torch.manual_seed(1)
    approx = torch.randn(2, 3, 9, 10)                       # 1 prefix + 9 queries, 10 keys
    mask = topk_connectivity(approx, keep=4, num_prefix=1)
    assert mask.shape == (2, 3, 10, 10)
    assert mask[:, :, 0].all()                              # class-token row dense
    assert (mask[:, :, 1:].sum(-1) == 4).all()              # exactly k keys per other query
    kept_min = approx.masked_fill(~mask[:, :, 1:], float("inf")).amin(-1)
    dropped_max = approx.masked_fill(mask[:, :, 1:], float("-inf")).amax(-1)
    assert (kept_min >= dropped_max).all()                  # the kept keys are the k best


def test_masked_attention_matches_reference():
    """The block's attention equals softmax over the kept keys only, computed independently."""
    model = _sparse("sparsifiner:keep_rate=0.3")
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv_heads(x)
        mask = topk_connectivity(attn.predictor(q, k), attn.keep, 1)
        ref = torch.zeros_like(q)
        for b, h, i in ((b, h, i) for b in range(2) for h in range(2) for i in range(17)):
            keys = mask[b, h, i].nonzero()[:, 0]
            w = ((q[b, h, i] @ k[b, h, keys].T) * attn.scale).softmax(-1)
            ref[b, h, i] = w @ v[b, h, keys]
        ref = attn.proj(ref.transpose(1, 2).reshape(2, 17, 32))
    assert attn.keep == math.ceil(0.3 * 17)
    assert (out - ref).abs().max() < 1e-5


def test_predictor_is_the_official_low_rank_form():
    torch.manual_seed(2)
    pred = ConnectivityPredictor(num_heads=2, head_dim=16, num_tokens=17, num_prefix=1, reduce_n=6, reduce_c=2)
    q, k = torch.randn(2, 2, 17, 16), torch.randn(2, 2, 17, 16)
    # official MaskPredictor.forward (training / USE_ATTN_RECON path), written out
    qc, kc = pred.proj_q(q), pred.proj_k(k)
    cheap = (qc @ (kc.permute(0, 1, 3, 2) @ pred.proj_n)) * 2 ** -0.5
    ref = cheap[..., 1:, :].softmax(-1) @ pred.proj_back_n.permute(1, 0)
    assert pred.reduced_c == 8 and pred.reduced_n == 2
    assert torch.allclose(pred(q, k), ref, atol=1e-6)


def test_flops_drop_as_computed_by_hand():
    x = torch.randn(2, 1, 16, 16)
    base, model = _model(), _sparse("sparsifiner:keep_rate=0.25")
    N, p, H, d, depth, keep = 17, 1, 2, 16, 2, math.ceil(0.25 * 17)
    dense_attn = 2 * 2 * H * N * N * d * depth                  # q k^T + attn v, batch 2
    sparse_attn = 2 * 2 * H * (p * N + (N - p) * keep) * d * depth
    pred = 2 * depth * predictor_macs(H, d, N, p, 6, 2)
    executed = count_flops(model, x)
    assert executed.macs == count_flops(base, x).macs + pred   # masked attention runs dense, plus the predictor
    assert sparse_attention_macs(model) == (dense_attn, sparse_attn)
    flops = sparsifiner_flops(model, x)
    assert flops.macs == executed.macs - (dense_attn - sparse_attn)
    assert flops.flops == 2 * flops.macs


def test_distillation_loss_is_summed_mse_and_trains_only_the_predictor():
    model = _sparse()
    model.train()
    distill = ConnectivityDistill(model, weight=0.5)
    x = torch.randn(2, 1, 16, 16)
    with distill.step(global_step=0):
        model(x)
    pairs = [blk.attn.recorded for blk in model.blocks]
    ref = 0.5 * sum(F.mse_loss(a, f, reduction="sum") for a, f in pairs) / len(pairs)
    loss = distill.loss()
    assert torch.allclose(loss, ref)
    loss.backward()
    assert model.blocks[0].attn.predictor.proj_back_n.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad is None        # the predictor reads detached q and k
    model.zero_grad()
    model(x).sum().backward()                                   # the task loss: no gradient through the binary mask
    assert model.blocks[0].attn.predictor.proj_back_n.grad is None


def test_dense_phase_runs_full_attention():
    model = _sparse()
    base = _model()
    distill = ConnectivityDistill(model, weight=1.0, dense_steps=3)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        with distill.step(global_step=2):
            dense = model(x)
        sparse = model(x)
        ref = base(x)
    assert (dense - ref).abs().max() < 1e-5 and (sparse - ref).abs().max() > 1e-4


def test_recipe_and_options():
    assert vitlab.techniques.format_technique(parse_apply(["sparsifiner:keep_rate=0.5,reduce_n=4"])[0]) == \
        "sparsifiner:keep_rate=0.5,reduce_n=4"
    with pytest.raises(TechniqueError, match="keep_rate"):
        parse_apply(["sparsifiner:keep_rate=0"])
    with pytest.raises(TechniqueError, match="--apply sparsifiner"):
        ConnectivityDistill(_model(), 0.01)
    with pytest.raises(ValueError, match="distill"):
        SparsifinerRecipe(distill=-1)


def test_refuses_swin_and_a_second_token_technique():
    torch.manual_seed(0)
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=16, depths=(1, 1),
                               num_heads=(1, 2), window_size=4, num_classes=3)
    with pytest.raises(TechniqueNotApplicable, match="supports"):
        vitlab.apply_(swin, parse_apply(["sparsifiner"]))
    with pytest.raises(TechniqueError, match="one per model"):
        vitlab.apply_(_sparse(), parse_apply(["evit"]))
    with pytest.raises(TechniqueError, match="one per model"):
        vitlab.apply_(_sparse(), parse_apply(["sparsifiner"]))


def test_save_load_round_trip(tmp_path):
    model = _sparse("sparsifiner:keep_rate=0.4")
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.predictor.proj_back_n.add_(torch.randn_like(blk.attn.predictor.proj_back_n))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = vitlab.create_model(tmp_path / "ckpt")
    assert vitlab.techniques.format_technique(loaded.vitlab.techniques[0]) == "sparsifiner:keep_rate=0.4"
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_vitlab_train_with_the_recipe_trains_the_predictor_and_reloads(tmp_path):
    from safetensors.torch import load_file

    from vitlab.engine import TrainConfig, fit

    init = tmp_path / "init"
    vitlab.save_checkpoint(_model(), init)
    run = fit(TrainConfig(out=str(tmp_path / "run"), init=str(init), data="synthetic:n=64,classes=5",
                          apply=["sparsifiner:keep_rate=0.5"], recipe="sparsifiner:distill=0.01,dense_epochs=0.2",
                          epochs=1, batch_size=16, lr=3e-3, warmup_epochs=0, max_steps=2, eval_val=False,
                          progress=False, threads=1))
    weights = load_file(str(run / "model.safetensors"))
    assert any(k.endswith("attn.predictor.proj_back_n") for k in weights)
    loaded = vitlab.create_model(run)
    assert vitlab.techniques.format_technique(loaded.vitlab.techniques[0]) == "sparsifiner:keep_rate=0.5"
    before = _sparse("sparsifiner:keep_rate=0.5").blocks[0].attn.predictor.proj_back_n
    assert not torch.equal(loaded.blocks[0].attn.predictor.proj_back_n, before)
