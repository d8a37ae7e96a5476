"""CogACT (vitlab/agents/cogact.py): schedule and DDIM against diffusers, the DiT and sampler against the official
code (fixture from microsoft/CogACT@b174a1b on a tiny config), condition dropout, the task's metrics, the toy."""
import json
from pathlib import Path

import pytest
import torch

from vitlab.agents.cogact import (ActionDiT, CogACTPolicy, HeadConfig, alphas_cumprod, ddim_sample, ddim_step,
                                  ddim_timesteps, demonstrations, eps_from_output, mmd2, mode_scores, q_sample,
                                  train_policy, true_samples)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "cogact_official.pt"


def test_schedule_and_q_sample_equal_diffusers_ddpm():
    diffusers = pytest.importorskip("diffusers")
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    abar = alphas_cumprod(100)
    torch.testing.assert_close(abar, ddpm.alphas_cumprod, atol=1e-6, rtol=0)
    x0, noise = torch.randn(5, 8, 2), torch.randn(5, 8, 2)
    t = torch.tensor([0, 1, 50, 98, 99])
    torch.testing.assert_close(q_sample(x0, t, noise, abar), ddpm.add_noise(x0, noise, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_equals_diffusers_ddim(eta):
    diffusers = pytest.importorskip("diffusers")
    ddim = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                   set_alpha_to_one=True)
    ddim.set_timesteps(10)
    timesteps = ddim_timesteps(100, 10)
    assert ddim.timesteps.tolist() == timesteps == list(range(90, -1, -10))
    abar = alphas_cumprod(100)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 2, generator=gen)
    for i, t in enumerate(timesteps):
        eps, noise = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
        prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        ours = ddim_step(x, eps, abar[t], prev, eta=eta, noise=noise)
        theirs = ddim.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        x = theirs


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_x0_and_v_outputs_step_like_diffusers_ddim(prediction):
    diffusers = pytest.importorskip("diffusers")
    ddim = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                   set_alpha_to_one=True, prediction_type=prediction)
    ddim.set_timesteps(10)
    abar = alphas_cumprod(100)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 2, generator=gen)
    for t, prev in ((90, abar[80]), (40, abar[30]), (0, torch.tensor(1.0))):
        out = torch.randn(x.shape, generator=gen)
        ours = ddim_step(x, eps_from_output(out, x, abar[t], prediction), abar[t], prev)
        torch.testing.assert_close(ours, ddim.step(out, t, x).prev_sample, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction='x0'"):
        eps_from_output(out, x, abar[0], "x0")


def test_eta_one_over_every_step_is_diffusers_ddpm_ancestral():
    diffusers = pytest.importorskip("diffusers")
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    ddpm.set_timesteps(100)
    abar = alphas_cumprod(100)
    x = torch.randn(4, 8, 2, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for t in (99, 50, 1):                     # t = 0 has no noise in either and is checked by the DDIM tests
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        ours = ddim_step(x, eps, abar[t], abar[t - 1], eta=1.0, noise=noise)
        theirs = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_training_targets_warmup_and_ema():
    torch.manual_seed(0)
    demos = demonstrations(8, "test", seed=0)
    with pytest.raises(ValueError, match="prediction='x0'"):
        CogACTPolicy(HeadConfig(prediction="x0"))
    for prediction in ("sample", "v_prediction"):   # a zero-output head's loss is the mean square of its target
        model = CogACTPolicy(HeadConfig(prediction=prediction))
        torch.manual_seed(1)
        loss = model.loss(demos.images, demos.actions)
        if prediction == "sample":
            torch.testing.assert_close(loss, (demos.actions ** 2).mean())
        else:
            assert 0.3 < float(loss.detach()) < 1.0          # sqrt(abar) eps - sqrt(1 - abar) x0 has unit-ish variance
    states = []
    for ema in (0.0, 0.5):                          # same seed and batches: EMA ends between start and last step
        torch.manual_seed(0)
        model = CogACTPolicy(HeadConfig(depth=1, dim=16))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_policy(model, demos, steps=3, batch=4, warmup=2, ema=ema)
        states.append(model.state_dict())
    key = "head.final.weight"
    moved, averaged = (states[0][key] - before[key]).norm(), (states[1][key] - before[key]).norm()
    assert 0 < averaged < moved
    with pytest.raises(ValueError, match="warmup=3"):
        train_policy(model, demos, steps=3, warmup=3)
    with pytest.raises(ValueError, match="ema=1.0"):
        train_policy(model, demos, steps=3, ema=1.0)


def _official_net() -> tuple[ActionDiT, dict]:
    """Our DiT with the official tiny DiT's weights (renamed: x/z embedders are plain Linears here)."""
    fixture = torch.load(FIXTURE, weights_only=True)
    assert "b174a1b86deedfab4d198d935207e7bb0527994e" in fixture["source"]
    rename = {"x_embedder.linear.": "x_embedder.", "z_embedder.linear.": "z_embedder.",
              "z_embedder.uncondition": "uncondition", "final_layer.linear.": "final."}
    state = {}
    for key, value in fixture["state_dict"].items():
        for old, new in rename.items():
            key = key.replace(old, new)
        state[key] = value.reshape(-1) if key == "uncondition" else value
    net = ActionDiT(action_dim=2, horizon=4, cond_dim=16, dim=32, depth=2, heads=2)
    net.load_state_dict(state)
    return net.eval(), fixture


def test_dit_equals_official_forward():
    net, fixture = _official_net()
    with torch.no_grad():
        torch.testing.assert_close(net(fixture["x"], fixture["t"], fixture["z"]), fixture["eps"])


@pytest.mark.parametrize("cfg_scale,key", [(1.0, "samples"), (1.5, "samples_cfg")])
def test_ddim_sampler_equals_official_ddim_sample_loop(cfg_scale, key):
    net, fixture = _official_net()
    abar = alphas_cumprod(100)
    torch.testing.assert_close(abar.double(), fixture["alphas_cumprod"], atol=1e-6, rtol=0)
    torch.testing.assert_close(q_sample(fixture["x0"], fixture["t"], fixture["noise"], abar), fixture["q_sample"])
    out = ddim_sample(net, fixture["z"], fixture["noise"], abar, steps=10, cfg_scale=cfg_scale)
    torch.testing.assert_close(out, fixture[key], atol=1e-5, rtol=1e-5)


def test_condition_dropout_replaces_z_by_uncondition():
    torch.manual_seed(0)
    net = ActionDiT(action_dim=2, horizon=4, cond_dim=6, dim=16, depth=1, heads=2, cond_dropout=1.0)
    torch.nn.init.normal_(net.final.weight)
    x, t, z = torch.randn(3, 4, 2), torch.tensor([3, 40, 90]), torch.randn(3, 6)
    train_out = net.train()(x, t, z)                               # every condition dropped
    torch.testing.assert_close(train_out, net(x, t, torch.randn(3, 6)))
    torch.testing.assert_close(train_out, net.eval()(x, t, net.uncondition.expand(3, 6).detach()))
    assert not torch.allclose(net(x, t, z), train_out)             # eval: no dropout
    eps_c, eps_u = net(x, t, z), net(x, t, z, drop=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(net.guided_eps(x, t, z, 2.0), eps_u + 2.0 * (eps_c - eps_u))


def test_demonstrations_are_bimodal_and_scored_by_side():
    demos = demonstrations(200, "train", seed=0)
    assert demos.images.shape == (200, 1, 28, 28) and demos.actions.shape == (200, 8, 2)
    score = mode_scores(demos.actions[:, None], demos.centre)[:, 0]
    assert (score.abs() - 1).abs().max() < 0.25                    # every path is clearly left or right
    assert 0.4 < (score > 0).float().mean() < 0.6
    truth = true_samples(demos.centre[:2], 500, 8, torch.Generator().manual_seed(1))
    assert 0.45 < (mode_scores(truth, demos.centre[:2]) > 0).float().mean() < 0.55


def test_mmd2_unbiased_formula_and_mode_collapse():
    a, b = torch.tensor([[0.0, 0.0], [0.1, 0.0]]), torch.tensor([[0.0, 0.1], [0.3, 0.3]])
    k = lambda u, v: torch.exp(-((u - v) ** 2).mean() / (2 * 0.05 ** 2))
    hand = k(a[0], a[1]) + k(b[0], b[1]) - 2 * sum(k(u, v) for u in a for v in b) / 4
    torch.testing.assert_close(mmd2(a, b), hand)
    gen = torch.Generator().manual_seed(0)
    centre = torch.tensor([[0.5, 0.5]])
    unit = lambda p: ((p[0] + 1) / 2).flatten(1)
    truth, other = true_samples(centre, 64, 8, gen), true_samples(centre, 64, 8, gen)
    assert abs(float(mmd2(unit(truth), unit(other)))) < 0.05
    one_side = truth[:, mode_scores(truth, centre)[0] > 0]         # only the right-hand paths
    assert 0.35 < float(mmd2(unit(one_side), unit(other))) < 0.65   # a one-mode model: about 0.5


def test_policy_shapes_and_regressor_is_deterministic():
    torch.manual_seed(0)
    demos = demonstrations(4, "test", seed=0)
    for diffusion in (True, False):
        model = CogACTPolicy(HeadConfig(diffusion=diffusion)).eval()
        assert model.loss(demos.images, demos.actions).ndim == 0
        paths = model.sample(demos.images, 3, torch.Generator().manual_seed(0))
        assert paths.shape == (4, 3, 8, 2) and torch.isfinite(paths).all()
        if not diffusion:
            torch.testing.assert_close(paths[:, 0], paths[:, 2])


def test_toy_quick_through_the_cli(tmp_path):
    from vitlab.cli import main

    assert main(["toy", "cogact", "--quick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for key in ("diffusion_mmd2", "mse_mmd2", "diffusion_left", "diffusion_right", "mse_neither", "mmd2_bound"):
        assert key in metrics
    assert metrics["diffusion_params"] == metrics["mse_params"]
