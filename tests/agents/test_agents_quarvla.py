"""QUAR-VLA (vitlab/agents/quarvla.py): the uniform action tokenizer, the tiny VLA model, the toy."""
import json

import pytest
import torch

from vitlab.agents import reach
from vitlab.agents.quarvla import TOY_TOKENIZER, ActionTokenizer, TinyVLA, train_vla, vla_batch


@pytest.mark.parametrize("bins", [1, 3, 7, 256])
def test_round_trip_within_half_a_bin(bins):
    tok = ActionTokenizer(low=(-1.0, 0.0, -5.0), high=(1.0, 2.0, 15.0), bins=bins)
    gen = torch.Generator().manual_seed(0)
    low, high = torch.tensor(tok.low), torch.tensor(tok.high)
    actions = low + (high - low) * torch.rand(1000, 3, generator=gen)
    tokens = tok.encode(actions)
    assert tokens.dtype == torch.long and int(tokens.min()) >= 0 and int(tokens.max()) < bins
    err = (tok.decode(tokens) - actions).abs()
    assert bool((err <= tok.width / 2 + 1e-6).all())
    # the bin index is floor((a - low) / width), written out per element
    manual = torch.tensor([[min(int((a - lo) / ((hi - lo) / bins)), bins - 1) for a, lo, hi in
                            zip(row, tok.low, tok.high)] for row in actions.tolist()])
    assert torch.equal(tokens, manual)


def test_bounds_and_out_of_range_actions():
    tok = ActionTokenizer(low=(-1.0,), high=(1.0,), bins=4)
    edges = torch.tensor([[-1.0], [-0.5], [0.0], [0.5], [1.0], [-7.0], [7.0]])
    assert tok.encode(edges).squeeze(1).tolist() == [0, 1, 2, 3, 3, 0, 3]      # top edge -> last bin; clamped
    assert tok.decode(torch.tensor([[0], [3]])).squeeze(1).tolist() == [-0.75, 0.75]
    err = (tok.decode(tok.encode(edges)) - edges.clamp(-1, 1)).abs()
    assert float(err.max()) <= 0.25                                            # half a bin at the bounds too


def test_bad_tokenizer_configs():
    with pytest.raises(ValueError, match="low < high"):
        ActionTokenizer(low=(1.0,), high=(1.0,))
    with pytest.raises(ValueError, match="low < high"):
        ActionTokenizer(low=(0.0, 0.0), high=(1.0,))
    with pytest.raises(ValueError, match="bins"):
        ActionTokenizer(low=(0.0,), high=(1.0,), bins=0)


def test_toy_tokenizer_is_exact_on_the_toy_moves():
    assert torch.equal(TOY_TOKENIZER.decode(TOY_TOKENIZER.encode(reach.ACTIONS)), reach.ACTIONS.float())


def test_padding_and_absent_extra_tokens_are_not_attended():
    torch.manual_seed(0)
    model = TinyVLA().eval()
    frames = torch.rand(2, 2, reach.CANVAS, reach.CANVAS)
    words = reach.tokenize(["move the bag to the top left", "move the ankle boot to the bottom right"])
    extra = torch.randn(2, 3, model.cfg.dim)
    present = torch.tensor([[True, False, True], [False, False, False]])
    base = model(frames, words, extra, present)[0]
    extra2 = extra.clone()
    extra2[~present] = torch.randn(int((~present).sum()), model.cfg.dim)
    torch.testing.assert_close(model(frames, words, extra2, present)[0], base)
    with torch.no_grad():
        model.word_embed.weight[0] += 1.0                                      # the padding word's embedding
    torch.testing.assert_close(model(frames, words, extra, present)[0], base)
    assert base.shape == (2, 2, TOY_TOKENIZER.bins)


def test_training_lowers_the_loss():
    ep = reach.expert_episodes(8, "train", instruct=True, seed=0)
    scene, frames, words, actions = vla_batch(ep, ep.transitions()[:4])
    assert frames.shape == (4, 2, reach.CANVAS, reach.CANVAS) and words.shape == (4, reach.TEXT_LEN)
    assert torch.equal(actions, reach.expert_actions(scene))
    torch.manual_seed(0)
    history = train_vla(TinyVLA(), ep, steps=12, batch=8, lr=3e-3)
    assert sum(history[-3:]) < sum(history[:3])


def test_toy_quick_through_the_cli(tmp_path):
    from vitlab.cli import main

    assert main(["toy", "quar-vla", "--quick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert {"success", "success_wrong_instruction", "token_acc", "bins"} <= set(metrics)
