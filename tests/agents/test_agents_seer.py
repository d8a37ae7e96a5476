"""Seer (vitlab/agents/seer.py): the block-causal attention mask, the model's information flow, losses, the toy."""
import json
from pathlib import Path

import pytest
import torch

from vitlab.agents import reach
from vitlab.agents.seer import (ACTION, FORESIGHT, OBS, SeerConfig, SeerPolicy, block_causal_mask, seer_losses,
                                token_layout, train_policy, windows)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "seer_attention_mask.json"


def _brute_force(steps: int, n_obs: int, n_foresight: int) -> torch.Tensor:
    """The mask's rules written out over every (query, key) pair."""
    kinds = [OBS] * n_obs + [FORESIGHT] * n_foresight + [ACTION]
    tokens = [(t, k) for t in range(steps) for k in kinds]
    mask = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
    for i, (qt, qk) in enumerate(tokens):
        for j, (kt, kk) in enumerate(tokens):
            if kt > qt:
                continue                          # no token sees a later step
            if kk == OBS:
                mask[i, j] = True                 # every token sees the observations of steps <= its own
            elif qk == ACTION and kk == FORESIGHT and kt == qt:
                mask[i, j] = True                 # the action token sees its own step's foresight
    return mask


@pytest.mark.parametrize("steps,n_obs,n_foresight", [(1, 1, 1), (2, 3, 1), (3, 4, 2), (4, 25, 1), (3, 5, 0)])
def test_mask_equals_brute_force_rules(steps, n_obs, n_foresight):
    assert torch.equal(block_causal_mask(steps, n_obs, n_foresight), _brute_force(steps, n_obs, n_foresight))


def test_mask_equals_official_generate_attention_mask():
    fixture = json.loads(FIXTURE.read_text())
    assert "ee228e110e098beefa23f94d558dfa8492259e6e" in fixture["source"]
    for case in fixture["cases"]:
        blocked = torch.tensor([[c == "1" for c in row] for row in case["blocked"]])
        assert torch.equal(block_causal_mask(case["steps"], case["n_obs"], case["n_foresight"]), ~blocked)


def test_token_layout():
    step, kind = token_layout(2, 2, 1)
    assert step.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert kind.tolist() == [OBS, OBS, FORESIGHT, ACTION] * 2


def _frames(batch: int = 3, steps: int = 2) -> torch.Tensor:
    return torch.rand(batch, steps, 2, reach.CANVAS, reach.CANVAS)


def test_outputs_of_a_step_ignore_later_frames():
    torch.manual_seed(0)
    model = SeerPolicy(SeerConfig(steps=3)).eval()
    frames = _frames(steps=3)
    changed = frames.clone()
    changed[:, 2] = torch.rand_like(changed[:, 2])
    a, b = model(frames), model(changed)
    torch.testing.assert_close(a["future_pred"][:, :2], b["future_pred"][:, :2])
    torch.testing.assert_close(a["logits"][:, :2], b["logits"][:, :2])
    assert not torch.allclose(a["logits"][:, 2], b["logits"][:, 2])


def test_foresight_never_reads_the_action_token_and_the_action_reads_the_foresight():
    torch.manual_seed(0)
    model = SeerPolicy(SeerConfig()).eval()
    frames = _frames()
    before = model(frames)
    with torch.no_grad():                         # a random shift (a constant one would vanish in LayerNorm)
        model.action_query.add_(torch.randn_like(model.action_query))
    after = model(frames)
    torch.testing.assert_close(before["future_pred"], after["future_pred"])
    assert not torch.allclose(before["logits"], after["logits"])
    with torch.no_grad():
        model.foresight_query.add_(torch.randn_like(model.foresight_query))
    moved = model(frames)
    assert not torch.allclose(after["future_pred"], moved["future_pred"])


def test_id_token_drop_zeroes_the_action_token_of_the_teacher_forced_branch_in_training_only():
    torch.manual_seed(0)
    frames, future = _frames(), _frames()
    model = SeerPolicy(SeerConfig(id_token_drop=1.0))      # train mode; the trunk has no dropout
    before = model(frames, future)
    with torch.no_grad():
        model.action_query.add_(torch.randn_like(model.action_query))
    after = model(frames, future)
    torch.testing.assert_close(before["logits_true"], after["logits_true"])     # every row dropped: token unused
    assert not torch.allclose(before["logits"], after["logits"])                # the acting branch still reads it
    model.eval()
    evaluated = model(frames, future)
    assert not torch.allclose(evaluated["logits_true"], after["logits_true"])   # at evaluation the token is kept


def test_losses_and_a_few_steps_of_training():
    ep = reach.expert_episodes(8, "train", instruct=False, seed=0)
    for foresight in (True, False):
        torch.manual_seed(0)
        model = SeerPolicy(SeerConfig(foresight=foresight))
        rows = ep.transitions()[:16]
        now, nxt, actions, valid = windows(ep, rows, model.cfg.steps)
        assert now.shape == (16, 2, 2, reach.CANVAS, reach.CANVAS)
        assert torch.equal(valid[:, 0], rows[:, 1] > 0) and valid[:, 1].all()
        e, t = rows[:, 0], rows[:, 1]
        torch.testing.assert_close(now[:, 1], reach.frames(ep.scene.select(e), ep.pos[e, t]))
        torch.testing.assert_close(nxt[:, 1], reach.frames(ep.scene.select(e), ep.pos[e, t + 1]))
        assert torch.equal(actions[:, 1], ep.actions[e, t])
        losses = seer_losses(model, now, nxt, actions, valid)
        assert set(losses) == ({"action", "foresight", "inverse_true", "loss"} if foresight else {"action", "loss"})
        history = train_policy(model, ep, steps=12, batch=8, lr=3e-3)
        assert sum(history[-3:]) < sum(history[:3])


def test_toy_quick_through_the_cli(tmp_path):
    from vitlab.cli import main

    assert main(["toy", "seer", "--quick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for key in ("seer_success", "bc_success", "seer_inverse_true_acc", "seer_params", "bc_params"):
        assert key in metrics
    assert 0.0 <= metrics["seer_success"] <= 1.0
