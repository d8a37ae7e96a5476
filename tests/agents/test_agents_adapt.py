"""ADAPT (vitlab/agents/adapt.py): the modality-alignment loss against open_clip's ClipLoss, masking, the
sequential-consistency loss, prompt retrieval, the toy."""
import json

import pytest
import torch
import torch.nn.functional as F

from vitlab.agents import reach
from vitlab.agents.adapt import (HORIZONTAL_P, VERTICAL_P, AdaptAgent, PromptBase, modality_alignment_loss,
                                 phase_prompt, sequential_consistency_loss)


def _features(n: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=gen), dim=-1),
            F.normalize(torch.randn(n, dim, generator=gen), dim=-1))


@pytest.mark.parametrize("n,scale", [(1, 1.0), (5, 14.285), (12, 100.0)])
def test_alignment_equals_open_clip_clip_loss(n, scale):
    loss_mod = pytest.importorskip("open_clip.loss")
    image, text = _features(n)
    expected = loss_mod.ClipLoss()(image, text, torch.tensor(scale))
    torch.testing.assert_close(modality_alignment_loss(image, text, torch.tensor(scale)), expected)
    present = torch.ones(n, dtype=torch.bool)
    torch.testing.assert_close(modality_alignment_loss(image, text, scale, present), expected)


def test_masked_pairs_contribute_nothing():
    loss_mod = pytest.importorskip("open_clip.loss")
    image, text = _features(10, seed=1)
    present = torch.tensor([True, False, True, True, False, True, True, False, True, True])
    image = image.clone().requires_grad_(True)
    loss = modality_alignment_loss(image.reshape(2, 5, -1), text.reshape(2, 5, -1), 10.0, present.reshape(2, 5))
    expected = loss_mod.ClipLoss()(image[present].detach(), text[present], torch.tensor(10.0))
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert image.grad[~present].abs().sum() == 0 and image.grad[present].abs().sum() > 0
    none = modality_alignment_loss(image, text, 10.0, torch.zeros(10, dtype=torch.bool))
    assert float(none.detach()) == 0.0


def test_sequential_consistency_by_hand():
    state = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]] * 3)
    target = torch.tensor([1, 2, 0])
    present = torch.tensor([[True, True, True], [True, True, False], [True, False, True]])
    tau = 0.5
    # row 1's target (prompt 2) is absent: skipped; row 2 cannot pick the absent prompt 1
    rows = []
    for b, t in ((0, 1), (2, 0)):
        cos = torch.tensor([F.cosine_similarity(state[b], prompts[b, p], dim=0) if present[b, p] else float("-inf")
                            for p in range(3)])
        rows.append(-torch.log_softmax(cos / tau, 0)[t])
    expected = torch.stack(rows).mean()
    torch.testing.assert_close(sequential_consistency_loss(state, prompts, target, present, tau), expected)
    assert float(sequential_consistency_loss(state, prompts, target, torch.zeros(3, 3, dtype=torch.bool))) == 0.0


def test_phase_prompt_follows_the_expert():
    ep = reach.expert_episodes(16, "test", instruct=True, seed=2)
    for e in range(16):
        for t in range(int(ep.length[e])):
            scene = reach.Scene(**{**ep.scene.select(torch.tensor([e])).__dict__, "pos": ep.pos[e:e + 1, t]})
            horizontal = int(ep.actions[e, t]) in (3, 4)
            assert int(phase_prompt(scene)) == (HORIZONTAL_P if horizontal else VERTICAL_P)


def test_retrieved_prompts_match_the_instruction():
    base = PromptBase(exemplars=3)
    scene = reach.reset(8, "test", True, torch.Generator().manual_seed(0))
    images, words = base.retrieve(scene, torch.Generator().manual_seed(1))
    assert images.shape == (8, 3, 2, reach.CANVAS, reach.CANVAS) and words.shape == (8, 3, reach.TEXT_LEN)
    text = [[" ".join(reach.VOCAB[i] for i in row if i) for row in prompt] for prompt in words.tolist()]
    for b, instruction in enumerate(reach.instructions(scene)):
        cls, corner = instruction[len("move "):].split(" to the ")
        assert text[b][0] == cls
        assert text[b][1] == "to the " + corner.split()[1] and text[b][2] == "to the " + corner.split()[0]
        assert images[b, 0, 1].sum() == 0 and images[b, 0, 0].sum() > 0       # the item exemplar, no outline
        assert images[b, 1:, 0].sum() == 0                                     # edge sub-goals: outline only
        cols = images[b, 1, 1].sum(0).nonzero()
        assert (int(cols.min()) == 0) == corner.endswith("left")


def test_agent_forward():
    torch.manual_seed(0)
    agent = AdaptAgent().eval()
    base = PromptBase(exemplars=2)
    scene = reach.reset(4, "test", True, torch.Generator().manual_seed(0))
    images, words = base.retrieve(scene, torch.Generator().manual_seed(0))
    out = agent.act(images, words, torch.ones(4, 3, dtype=torch.bool), reach.render(scene),
                    reach.tokenize(reach.instructions(scene)))
    assert out["logits"].shape == (4, 2, 3) and out["state"].shape == (4, agent.cfg.dim)
    assert out["image"].shape == out["text"].shape == (4, 3, agent.cfg.dim)


def test_toy_quick_through_the_cli(tmp_path):
    from vitlab.cli import main

    assert main(["toy", "adapt", "--quick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert {"adapt_success", "plain_success", "adapt_token_acc", "plain_token_acc"} <= set(metrics)
