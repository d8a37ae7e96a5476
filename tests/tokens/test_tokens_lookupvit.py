"""LookupViT (vitlab.tokens.lookupvit): the block equations against a hand-written forward, shapes, FLOPs against
the per-block formula, refusal, save/load."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.checkpoint import save_checkpoint
from vitlab.profiling import count_flops
from vitlab.techniques import TechniqueError, TechniqueNotApplicable, format_technique, parse_apply
from vitlab.tokens.lookupvit import LookupBlocks, compressed_grid, lookup_block_macs


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return vitlab.create_model("vl_test_vit", num_classes=5, **kw).eval()   # 4x4 grid + class token, width 32


def _lookup(text: str = "lookupvit:tokens=4", seed: int = 0, **kw):
    return vitlab.apply_(_model(seed, **kw), parse_apply([text]))


def _reference(model, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's equations, written with plain tensor ops on the modules' weights."""
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    B, _, C = t.shape
    H = model.blocks[0].attn.num_heads
    d = C // H
    xp = t[:, 1:]
    pooled = xp.reshape(B, 4, 4, C).reshape(B, 2, 2, 2, 2, C).mean((2, 4)).reshape(B, 4, C)   # 2x2 means
    xc = torch.cat([t[:, :1], pooled], 1)

    def heads(z):
        return z.view(B, z.shape[1], H, d).transpose(1, 2)

    for i, blk in enumerate(model.blocks):
        g = blk.lookup.gather
        A = heads(g.q(g.norm_c(xc))) @ heads(g.k(g.norm_p(xp))).transpose(-2, -1) * d ** -0.5   # (B, H, M', N)
        xc = xc + g.proj((A.softmax(-1) @ heads(g.v(g.norm_p(xp)))).transpose(1, 2).reshape(B, -1, C))
        xc = xc + blk.attn(blk.norm1(xc))
        xc = xc + blk.mlp(blk.norm2(xc))
        if i < len(model.blocks) - 1:
            pr = blk.lookup.propagate
            vc = heads(pr.v(pr.norm_c(xc)))
            xp = xp + pr.proj((A.transpose(-2, -1).softmax(-1) @ vc).transpose(1, 2).reshape(B, -1, C))
            xp = xp + pr.mlp.fc2(F.gelu(pr.mlp.fc1(pr.norm2(xp))))
    return model.head(model.norm(xc)[:, 0])


def test_block_equations_against_hand_written_forward():
    model = _lookup()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5)
        assert (out - _reference(model, x)).abs().max() < 1e-5


def test_shapes_and_initialisation_from_the_block():
    model = _lookup("lookupvit:tokens=4,lookup_mlp_ratio=0.5")
    blocks = model.blocks
    assert isinstance(blocks, LookupBlocks) and blocks.compressed == (2, 2) and blocks.grid == (4, 4)
    blk = blocks[0]
    assert torch.equal(blk.lookup.gather.k.weight, blk.attn.qkv.weight[32:64])
    mlp = blk.lookup.propagate.mlp
    assert mlp.fc1.out_features == blk.mlp.fc1.out_features // 2
    rows = {tuple(r.tolist()) for r in blk.mlp.fc1.weight}
    assert all(tuple(r.tolist()) in rows for r in mlp.fc1.weight)   # kept hidden units are the block's own
    assert blocks[-1].lookup.propagate is None                      # nothing reads the last block's lookup tokens
    with torch.no_grad():
        assert model.forward_features(torch.randn(3, 1, 16, 16)).shape == (3, 1 + 4, 32)


def test_flops_match_the_formula():
    x = torch.randn(1, 1, 16, 16)
    base, model = _model(), _lookup("lookupvit:tokens=4")
    N, M, D, F_, depth = 16, 1 + 4, 32, 64, 2
    vit_block = 4 * (N + 1) * D * D + 2 * (N + 1) ** 2 * D + 2 * (N + 1) * D * F_
    lookup = sum(lookup_block_macs(N, M, D, F_, 16, propagate=i < depth - 1) for i in range(depth))
    assert count_flops(model, x).macs == count_flops(base, x).macs - depth * vit_block + lookup


def test_vit_b_scale_flops():
    """ViT-B/16 at 224 (196 tokens, D 768, MLP 3072, 12 blocks), 7x7 compressed tokens, lookup MLP a quarter as wide:
    the formula gives 0.698x the blocks' MACs (1.43x fewer; the full-resolution tokens' K/V projections, output
    projection and MLP stay, 5 N D^2 of ViT's 12 N D^2 per block)."""
    N, D, F_ = 196, 768, 3072
    vit = 12 * (4 * 197 * D * D + 2 * 197 ** 2 * D + 2 * 197 * D * F_)
    lookup = sum(lookup_block_macs(N, 50, D, F_, F_ // 4, propagate=i < 11) for i in range(12))
    assert lookup / vit == pytest.approx(0.698, abs=1e-3)


def test_compressed_grid():
    assert compressed_grid((14, 14), 49) == (7, 7)
    assert compressed_grid((14, 14), 16) == (4, 4)
    assert compressed_grid((4, 8), 8) == (2, 4)
    assert compressed_grid((2, 2), 7) is None


def test_options_and_refusals():
    with pytest.raises(TechniqueError, match="fewer than"):
        _lookup("lookupvit:tokens=16")
    with pytest.raises(TechniqueError, match="lookup_mlp_ratio"):
        parse_apply(["lookupvit:lookup_mlp_ratio=0"])
    torch.manual_seed(0)
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=16, depths=(1, 1),
                               num_heads=(1, 2), window_size=4, num_classes=3)
    with pytest.raises(TechniqueNotApplicable, match="supports"):
        vitlab.apply_(swin, parse_apply(["lookupvit"]))
    with pytest.raises(TechniqueNotApplicable, match="supports"):
        vitlab.apply_(_model(global_pool="map"), parse_apply(["lookupvit:tokens=4"]))
    with pytest.raises(TechniqueError, match="one per model"):
        vitlab.apply_(_lookup(), parse_apply(["evit"]))


def test_trains_and_save_load_round_trip(tmp_path):
    model = _lookup("lookupvit:tokens=4")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    assert model.blocks[0].lookup.gather.q.weight.grad.abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = vitlab.create_model(tmp_path / "ckpt")
    assert format_technique(loaded.vitlab.techniques[0]) == "lookupvit:tokens=4"
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_vitlab_train_init_apply_lookupvit(tmp_path):
    from vitlab.engine import TrainConfig, fit

    init = tmp_path / "init"
    vitlab.save_checkpoint(_model(), init)
    run = fit(TrainConfig(out=str(tmp_path / "run"), init=str(init), data="synthetic:n=64,classes=5",
                          apply=["lookupvit:tokens=4"], epochs=1, batch_size=16, lr=3e-3, warmup_epochs=0,
                          max_steps=1, eval_val=False, progress=False, threads=1))
    loaded = vitlab.create_model(run)
    assert isinstance(loaded.blocks, LookupBlocks)
    assert not torch.equal(loaded.blocks[0].lookup.gather.q.weight, _lookup().blocks[0].lookup.gather.q.weight)
