"""VideoMAE against transformers' implementation (weights copied): classification logits, the pre-training loss
and predictions under the same tube mask; the tube mask's and the target's stated properties; the contract;
VideoMAE V2's dual masking (the running-cell pattern against the official generator's, its stated properties, the
loss over the decoder's tokens only)."""
import copy

import pytest
import torch

import vitlab
from vitlab.models import from_transformers
from vitlab.models.videomae import (VideoMAE, VideoMAEPretrainer, normalized_patches, patchify, running_cell_mask,
                                    sinusoid_table, tube_mask)

transformers = pytest.importorskip("transformers")


def _config(**kw):
    return transformers.VideoMAEConfig(image_size=32, patch_size=8, num_channels=1, num_frames=4, tubelet_size=2,
                                       hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=2,
                                       decoder_num_attention_heads=2, decoder_intermediate_size=32, num_labels=5, **kw)


def _randomize(model):
    """HF initialises biases and LayerNorms to constants; random values make the comparison meaningful."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_sinusoid_table_matches_transformers():
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    assert torch.allclose(sinusoid_table(37, 24), get_sinusoid_encoding_table(37, 24)[0], atol=1e-7)


@pytest.mark.parametrize("act", ["gelu", "gelu_fast"])
def test_classification_matches_transformers(act):
    hf = _randomize(transformers.VideoMAEForVideoClassification(_config(hidden_act=act)))
    ours = from_transformers(hf)
    assert isinstance(ours, VideoMAE)
    clips = torch.randn(3, 1, 4, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=clips.transpose(1, 2)).logits
        got = ours(clips)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_pretraining_matches_transformers():
    hf = _randomize(transformers.VideoMAEForPreTraining(_config()))
    ours = from_transformers(hf).eval()
    assert isinstance(ours, VideoMAEPretrainer)
    clips = torch.randn(2, 1, 4, 32, 32)
    mask = tube_mask(2, ours.encoder.patch_embed.grid_size, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf(pixel_values=clips.transpose(1, 2), bool_masked_pos=mask)
        pred = ours(clips, mask)
        loss = ours.loss(clips, mask)
    assert torch.allclose(pred, out.logits, atol=1e-5), (pred - out.logits).abs().max()
    assert torch.allclose(loss, out.loss, rtol=1e-5)


def test_tube_mask_is_the_same_in_every_frame_and_exact_in_count():
    mask = tube_mask(5, (3, 4, 4), 0.9, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 48) and mask.dtype == torch.bool
    frames = mask.reshape(5, 3, 16)
    assert (frames == frames[:, :1]).all()                      # a tube: one spatial mask through time
    assert (frames[:, 0].sum(1) == int(0.9 * 16)).all()          # 14 of 16 positions per frame
    assert not torch.equal(frames[0, 0], frames[1, 0])           # each clip its own positions
    with pytest.raises(ValueError, match="mask at least one"):
        tube_mask(1, (1, 2, 2), 0.2)                              # int(0.2 * 4) = 0 positions


def test_patchify_follows_the_tubelet_embedding_order():
    """Token n of patchify holds exactly the pixels the tubelet embedding's token n sees: a conv whose kernel picks
    one pixel of the tubelet reads the same value as patchify's matching entry."""
    embed = vitlab.create_model("vl_test_videomae").patch_embed
    clips = torch.randn(2, 1, 10, 32, 32)
    patches = patchify(clips, embed.tubelet_size)                 # (B, N, 2*8*8, C)
    with torch.no_grad():
        embed.proj.weight.zero_()
        embed.proj.bias.zero_()
        embed.proj.weight[0, 0, 1, 3, 5] = 1.0                    # channel 0 reads pixel (kt=1, kh=3, kw=5)
        tokens = embed(clips).flatten(1, 2)                       # (B, N, D)
    assert torch.equal(tokens[..., 0], patches[:, :, 1 * 64 + 3 * 8 + 5, 0])
    target = normalized_patches(clips, embed.tubelet_size)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 80), atol=1e-5)
    assert torch.allclose(target.std(-1), torch.ones(2, 80), atol=1e-3)


def test_pretrainer_learns_and_keeps_the_encoder():
    torch.manual_seed(0)
    encoder = vitlab.create_model("vl_test_videomae")
    trainer = VideoMAEPretrainer(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2, mask_ratio=0.75)
    # every tubelet holds one pattern at its own brightness and contrast: the normalised target is the same for all
    pattern = torch.randn(1, 1, 2, 8, 8)
    contrast = torch.rand(4, 1, 5, 4, 4) + 0.5                  # one per tubelet (2 x 8 x 8 pixels)
    contrast = contrast.repeat_interleave(2, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
    clips = pattern.repeat(4, 1, 5, 4, 4) * contrast + 0.3      # (4, 1, 10, 32, 32)
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss = trainer.loss(clips, generator=torch.Generator().manual_seed(0))   # one fixed mask: memorisable
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert trainer.encoder is encoder and encoder(clips).shape == (4, 6)
    with pytest.raises(TypeError, match="VideoMAE encoder"):
        VideoMAEPretrainer(vitlab.create_model("vl_test_vivit"))


def test_pretrainer_normalises_the_encoder_output():
    """Official PretrainVisionTransformerEncoder ends in a LayerNorm before encoder_to_decoder (transformers' model
    with mean pooling has none: its converter leaves it out, as test_pretraining_matches_transformers checks)."""
    trainer = _dual(0.0)
    seen = {}
    trainer.encoder_to_decoder.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        trainer.encoder_norm.weight.fill_(3.0)
        trainer.loss(torch.randn(2, 1, 10, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen["x"].std(-1, unbiased=False), torch.full(seen["x"].shape[:2], 3.0), atol=1e-3)
    assert isinstance(from_transformers(transformers.VideoMAEForPreTraining(_config())).encoder_norm,
                      torch.nn.Identity)


def test_published_parameter_count():
    """VideoMAE ViT-B/16 with a 400-class head: 87 M parameters (the model zoo's 87M; timm-style count)."""
    with torch.device("meta"):
        model = vitlab.create_model("vl_videomae_b")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 86.5) < 0.5


def test_contract_and_token_reduction_over_tubelets():
    from vitlab.contract import describe

    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_videomae").eval()
    spec = describe(model)
    assert [b.name for b in spec.blocks] == ["blocks.0", "blocks.1"] and spec.num_prefix_tokens == 0
    assert all(b.token_reducible and b.mixer.kind == "attention" for b in spec.blocks)
    clips = torch.randn(4, 1, 10, 32, 32)
    with torch.no_grad():
        ref = model(clips)
        exact = vitlab.apply_(copy.deepcopy(model), vitlab.parse_apply(["tome:r=0"]))(clips)
        merged = vitlab.apply_(copy.deepcopy(model), vitlab.parse_apply(["tome:r=8"]))(clips)
    assert torch.allclose(exact, ref, atol=1e-6)     # the size-weighted mean of unmerged tokens is the plain mean
    assert 0 < float((merged - ref).norm() / ref.norm()) < 0.05


# VideoMAE V2 dual masking. The official RunningCellMaskingGenerator((4, 2, 2), ratio).all_mask_maps, one map per
# starting pointer, flattened (t, h, w) (github.com/OpenGVLab/VideoMAEv2 at 29eab1e, dataset/masking_generator.py)
OFFICIAL_RUNNING_CELLS = {
    0.5: [[1, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1],
          [0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0]],
    0.25: [[0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1],
           [0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]],
}


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_running_cell_mask_is_the_official_pattern(ratio):
    mask = running_cell_mask(64, (4, 2, 2), ratio, torch.Generator().manual_seed(0))
    rows = {tuple(r) for r in mask.int().tolist()}
    assert rows == {tuple(r) for r in OFFICIAL_RUNNING_CELLS[ratio]}   # each clip one of the 4 starts, all drawn


def test_running_cell_mask_properties():
    """VideoMAE V2 Sec. 3.2: the same 2x2 cell tiled over space; in every cell and frame exactly int(4 * ratio)
    positions dropped; the cell runs one step per frame, so over 4 consecutive frames every position is kept
    4 - int(4 * ratio) times (the kept tokens cover the clip evenly in space and time)."""
    mask = running_cell_mask(3, (6, 4, 6), 0.5, torch.Generator().manual_seed(1))
    assert mask.shape == (3, 6 * 4 * 6) and mask.dtype == torch.bool
    grid = mask.reshape(3, 6, 2, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(3, 6, 6, 4)  # (B, T, cell, 2x2 pos)
    assert (grid == grid[:, :, :1]).all()                      # one cell, tiled
    assert (grid.sum(-1) == 2).all()                           # half of every cell dropped, every frame
    cell = grid[:, :, 0]                                       # (B, T, 4) in 2x2 reading order
    assert torch.equal(cell[:, 1:], cell[:, :-1].roll(-1, dims=-1))   # runs one step per frame
    assert ((cell[:, :4] == 0).sum(1) == 2).all() and ((cell[:, 2:] == 0).sum(1) == 2).all()
    with pytest.raises(ValueError, match="0.25, 0.5 or 0.75"):
        running_cell_mask(1, (2, 2, 2), 0.1)
    with pytest.raises(ValueError, match="not even"):
        running_cell_mask(1, (2, 3, 2), 0.5)


def _dual(decoder_mask_ratio=0.5):
    torch.manual_seed(0)
    return VideoMAEPretrainer(vitlab.create_model("vl_test_videomae"), decoder_dim=16, decoder_depth=1,
                              decoder_heads=2, mask_ratio=0.75, decoder_mask_ratio=decoder_mask_ratio)


def test_dual_masking_decodes_fewer_tokens_and_scores_only_them():
    trainer = _dual()
    clips = torch.randn(2, 1, 10, 32, 32)
    grid = trainer.encoder.patch_embed.grid_size                              # (5, 4, 4): 80 tokens
    mask = tube_mask(2, grid, 0.75, torch.Generator().manual_seed(0))      # 20 visible
    decode_mask = running_cell_mask(2, grid, 0.5, torch.Generator().manual_seed(0))  # 40 decoded
    seen = {}
    trainer.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(n=a[0].shape[1]))
    trainer.decoder_head.register_forward_hook(lambda m, a, out: seen.setdefault("pred", out).retain_grad())
    loss = trainer.loss(clips, mask, decode_mask=decode_mask)
    assert seen["n"] == 20 + 40                                               # not 20 + 60 as VideoMAE
    pred = seen["pred"]
    assert pred.shape == (2, 40, 2 * 8 * 8)
    decoded = ~decode_mask
    target = normalized_patches(clips, (2, 8, 8))[decoded].reshape(2, 40, -1)
    scored = mask[decoded].reshape(2, 40)                                    # masked for the encoder too
    expected = ((pred - target).pow(2).mean(-1)[scored]).mean()
    assert torch.allclose(loss, expected, rtol=1e-6)
    loss.backward()
    grad_rows = pred.grad.abs().sum(-1) > 0
    assert torch.equal(grad_rows, scored)                                     # visible decoded tokens: no loss
    assert 0 < scored.sum() < 80


def test_without_decoder_masking_the_dual_loss_is_videomae():
    """Official convention: no decoder mask means decode_masked_pos = ~bool_masked_pos; the loss is then V1's."""
    trainer = _dual(0.0).eval()
    clips = torch.randn(2, 1, 10, 32, 32)
    mask = tube_mask(2, trainer.encoder.patch_embed.grid_size, 0.75, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(trainer.loss(clips, mask), trainer.loss(clips, mask, decode_mask=~mask), rtol=1e-6)
        drawn = _dual(0.5).loss(clips, mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(drawn)


def test_cli_pretrains_with_dual_masking(tmp_path):
    from vitlab.cli import main

    run = tmp_path / "vmae2"
    assert main(["pretrain", "vl_test_videomae", "--method", "videomae2", "--data",
                 "moving-fashion-mnist-cls:clips=16", "--batch-size", "8", "--max-steps", "2", "--out", str(run),
                 "--no-progress", "--threads", "1"]) == 0
    assert vitlab.create_model(str(run)).num_frames == 10
