"""ToP-ViM on vitlab's Vision Mamba: the aligned scan and mixer against the full-length recurrence with the pruned
positions as zero inputs, the importance score, the schedule, keep_rate=1, refusals, the checkpoint round trip
and the benchmark's run cache."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.models.msvmamba import selective_scan_sequential
from vitlab.techniques import TechniqueError, TechniqueNotApplicable, parse_apply
from vitlab.tokens.topvim import (TopViM, aligned_mixer, aligned_selective_scan, prune_blocks, token_importance)

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the benchmark's run cache
from tokens_topvim import _folder, run_done  # noqa: E402


def _vim(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = vitlab.create_model("vl_test_vim", **kwargs).eval()
    for block in model.blocks:   # non-trivial dt biases and D (the init's are near-constant)
        for ssm in (block.mixer.ssm_fwd, block.mixer.ssm_bwd):
            ssm.dt_proj.bias.data.uniform_(-3, 0.5)
            ssm.D.data.normal_(1, 0.5)
    return model


def _kept_positions(length: int, keep: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=g)[:keep].sort().values for _ in range(batch)])  # (B, keep)


def test_importance_is_the_channel_mean_of_the_clipped_ssm_output():
    y = torch.tensor([[[1.0, -2.0, 0.5], [-1.0, 3.0, -0.5]]])   # (B=1, E=2, L=3)
    torch.testing.assert_close(token_importance(y), torch.tensor([[0.5, 1.5, 0.25]]))


def test_aligned_scan_equals_the_recurrence_with_zero_inputs_at_pruned_positions():
    torch.manual_seed(0)
    Bt, E, N, T = 2, 6, 3, 13
    u, delta = torch.randn(Bt, E, T), torch.randn(Bt, E, T)
    A, B, C = -torch.rand(E, N) * 2, torch.randn(Bt, N, T), torch.randn(Bt, N, T)
    D, bias = torch.randn(E), torch.randn(E)
    pos = _kept_positions(T, 7, Bt, seed=1)                     # (Bt, 7)
    mask = torch.zeros(Bt, T, dtype=torch.bool).scatter(1, pos, True)
    # the full-length scan, step by step, where a pruned position has u = 0, delta (before its bias) = 0 and B = 0
    y_full = selective_scan_sequential(u * mask[:, None], delta * mask[:, None], A, B * mask[:, None], C, D,
                                       delta_bias=bias, delta_softplus=True)
    gaps = pos - F.pad(pos[:, :-1], (1, 0), value=-1) - 1

    def take(t):
        return t.gather(2, pos[:, None].expand(-1, t.shape[1], -1))
    y = aligned_selective_scan(take(u), take(delta), A, take(B), take(C), D, bias, gaps)
    torch.testing.assert_close(y, take(y_full), atol=1e-5, rtol=1e-5)
    y0 = aligned_selective_scan(u, delta, A, B, C, D, bias, torch.zeros(Bt, T))   # no gaps: the plain scan
    torch.testing.assert_close(y0, selective_scan_sequential(u, delta, A, B, C, D, bias, True), atol=1e-5, rtol=1e-5)


def _masked_full_mixer(mixer, x_full: torch.Tensor, mask: torch.Tensor):
    """Vim's mixer on the full sequence with the pruned positions as zero inputs to the convs and the scans, written
    out from the module's parts: (B, T, C) output and the gated backward SSM output (B, E, T)."""
    T = x_full.shape[1]
    m = mask[:, None].float()                                   # (B, 1, T)
    xs, z = mixer.in_proj(x_full).transpose(1, 2).chunk(2, dim=1)
    xs = xs * m
    u_f = mixer.act(mixer.conv_fwd(xs)[..., :T]) * m
    u_b = mixer.act(mixer.conv_bwd(xs.flip(-1))[..., :T]).flip(-1) * m

    def scan(ssm, u):   # x_proj(0) = 0: dt = softplus(dt bias), B = C = 0 at the pruned positions
        dt_low, B, C = ssm.x_proj(u.transpose(1, 2)).split([ssm.dt_rank, ssm.d_state, ssm.d_state], dim=-1)
        delta = F.linear(dt_low, ssm.dt_proj.weight).transpose(1, 2)
        return selective_scan_sequential(u, delta, -torch.exp(ssm.A_log), B.transpose(1, 2), C.transpose(1, 2),
                                         ssm.D, ssm.dt_proj.bias, True)
    y_f = scan(mixer.ssm_fwd, u_f)
    y_b = scan(mixer.ssm_bwd, u_b.flip(-1)).flip(-1)
    gate = mixer.act(z)
    return mixer.out_proj(((y_f + y_b) * gate / 2).transpose(1, 2)), y_b * gate


def test_aligned_mixer_equals_the_full_sequence_with_pruned_positions_as_zero_inputs():
    mixer = _vim().blocks[1].mixer
    torch.manual_seed(1)
    Bsz, T, C = 2, 21, 32
    x_full = torch.randn(Bsz, T, C)
    pos = _kept_positions(T, 9, Bsz, seed=2)
    mask = torch.zeros(Bsz, T, dtype=torch.bool).scatter(1, pos, True)
    x_kept = x_full.gather(1, pos[:, :, None].expand(-1, -1, C))
    with torch.no_grad():
        out, score = aligned_mixer(mixer, x_kept, pos, T)
        ref_out, ref_y = _masked_full_mixer(mixer, x_full, mask)
        dense, _ = aligned_mixer(mixer, x_full, torch.arange(T).expand(Bsz, -1), T)
        by_hand, _ = _masked_full_mixer(mixer, x_full, torch.ones(Bsz, T, dtype=torch.bool))
    torch.testing.assert_close(out, ref_out.gather(1, pos[:, :, None].expand(-1, -1, C)), atol=1e-5, rtol=1e-4)
    ref_score = ref_y.clamp(min=0).mean(1).gather(1, pos)
    torch.testing.assert_close(score, ref_score, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(dense, mixer(x_full), atol=1e-5, rtol=1e-4)   # nothing pruned: Vim's mixer ...
    torch.testing.assert_close(mixer(x_full), by_hand, atol=1e-5, rtol=1e-4)  # ... = the step-by-step recurrence


def test_keep_rate_one_is_the_unpruned_model_exactly():
    model, x = _vim(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        vitlab.apply_(model, TopViM(keep_rate=1.0, locations=(0.25, 0.5)))
        assert torch.equal(model(x), ref)
    assert model.token_state.counts == [65] * 4


@pytest.mark.parametrize("keep_rate, locations, blocks, counts", [
    (0.5, (0.25, 0.5), [0, 1], [33, 17, 17, 17]),       # 64 patches -> 32 -> 16, class token kept
    (0.7, (0.5,), [1], [65, 46, 46, 46]),               # ceil(0.7 x 64) = 45
    (0.8, (5 / 24, 10 / 24, 15 / 24), [0, 1], [53, 43, 43, 43]),   # the official fractions on 4 blocks: 52, 42 patches
])
def test_token_counts_follow_the_schedule(keep_rate, locations, blocks, counts):
    cfg = TopViM(keep_rate=keep_rate, locations=locations)
    assert prune_blocks(cfg, 4) == blocks
    model = _vim()
    vitlab.apply_(model, cfg)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.token_state.counts == counts
    assert prune_blocks(TopViM(), 24) == [4, 9, 14]     # official: after layers 5, 10, 15 of Vim-S


def test_first_pruning_keeps_the_top_scored_tokens_and_the_class_token():
    model, x = _vim(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.embed(x)
        block = model.blocks[0]
        _, y_b = _masked_full_mixer(block.mixer, block.norm(tokens), torch.ones(2, 65, dtype=torch.bool))
        score = y_b.clamp(min=0).mean(1)                        # (B, 65), by hand from Vim's sublayers
        score[:, model.cls_index] = float("inf")
        expected = score.topk(33, dim=1).indices.sort(dim=1).values
        vitlab.apply_(model, TopViM(keep_rate=0.5, locations=(0.25,)))
        model(x)
    assert torch.equal(model.token_state.positions, expected)
    cls = model.token_state.cls_index                           # (B,): each row keeps its own count before it
    assert model.token_state.positions.gather(1, cls[:, None]).flatten().tolist() == [32, 32]


def test_without_alignment_the_kept_tokens_run_the_plain_blocks():
    model, x = _vim(), torch.randn(2, 3, 32, 32)
    vitlab.apply_(model, TopViM(keep_rate=0.5, locations=(0.5,), alignment=False))
    with torch.no_grad():
        logits = model(x)
        pos = model.token_state.positions
        h = model.blocks[1](model.blocks[0](model.embed(x)))
        h = h.gather(1, pos[:, :, None].expand(-1, -1, h.shape[-1]))
        h = model.norm(model.blocks[3](model.blocks[2](h)))
        cls = h[torch.arange(2), model.token_state.cls_index]
        torch.testing.assert_close(logits, model.head(cls), atol=1e-5, rtol=1e-4)
        aligned = _vim()
        vitlab.apply_(aligned, TopViM(keep_rate=0.5, locations=(0.5,)))
        aligned_logits = aligned(x)
    assert torch.equal(aligned.token_state.positions, pos)      # the same tokens kept ...
    assert not torch.allclose(aligned_logits, logits, atol=1e-4)  # ... but the later scans see their old distances


def test_refuses_a_vit_and_msvmamba_by_name():
    for name in ("vl_test_vit", "vl_test_msvmamba"):
        model = vitlab.create_model(name)
        with pytest.raises(TechniqueNotApplicable, match="supports") as err:
            vitlab.apply_(model, parse_apply(["topvim:keep_rate=0.7"]))
        assert "topvim" in str(err.value) and type(model).__name__ in str(err.value)


def test_bad_settings_are_refused_with_the_value():
    for text, word in (("topvim:keep_rate=0", "keep_rate"), ("topvim:locations=0/0.5", "locations"),
                       ("topvim:alignment=maybe", "alignment")):
        with pytest.raises(TechniqueError, match=word):
            parse_apply([text])


def test_checkpoint_round_trip_reapplies_the_pruning(tmp_path):
    cfg = TopViM(keep_rate=0.6, locations=(0.25, 0.75))
    model, x = _vim(), torch.randn(2, 3, 32, 32)
    vitlab.apply_(model, cfg)
    vitlab.save_checkpoint(model, tmp_path / "ck")
    again = vitlab.create_model(tmp_path / "ck").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    assert again.token_state.counts == model.token_state.counts == [40, 40, 25, 25]
    assert again.vitlab.techniques == (cfg,)


def test_pruned_model_trains():
    model = _vim()
    vitlab.apply_(model, TopViM(keep_rate=0.5, locations=(0.25, 0.5)))
    model.train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.blocks[3].mixer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.cls_token.grad.abs().sum() > 0


def test_benchmark_reuses_only_finished_runs_of_the_same_step_count(tmp_path):
    """benchmarks/tokens_topvim.py caches the base and fine-tune runs: a folder counts only once its metrics.jsonl
    reached the step count (a run killed after its first epoch, or one of other steps, is trained again), and every
    row's options get their own folder."""
    run = tmp_path / "base"
    run.mkdir()
    assert not run_done(run, 1500)                               # empty folder
    (run / "model.safetensors").write_bytes(b"")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 859}\n')
    assert not run_done(run, 1500)                               # stopped after its first epoch's checkpoint
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 859}\n{"epoch": 1.75, "step": 1500}\n')
    assert run_done(run, 1500) and not run_done(run, 3000)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 859}\n{"epoch": 1.75, "st')   # a torn last line
    assert not run_done(run, 1500)
    names = {_folder(s) for s in ("none", "topvim:keep_rate=0.7", "topvim:keep_rate=0.7,alignment=false",
                                  "topvim:keep_rate=0.5,locations=0.34", "topvim:keep_rate=0.5,locations=0.3/4")}
    assert len(names) == 5 and not any("/" in n or ":" in n for n in names)
