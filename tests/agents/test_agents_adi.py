"""ADI (vitlab/agents/adi.py): the gradient mask on a hand case, layer-wise tokens reaching each conditioning layer,
a frozen model after inversion steps, the triples, the actions and the toy's smoke run."""
import pytest
import torch

pytest.importorskip("diffusers")

from vitlab.agents.adi import (NULL_ACTION, NULL_SUBJECT, TARGET, ConditionedUNet, DiffusionConfig,
                               Exemplars, Identifier, InversionConfig, _triples, gradient_mask, invert, transform)

TINY = DiffusionConfig(channels=(8, 16), timesteps=50)


def test_gradient_mask_hand_case():
    # 8 channels, mask_rate 0.25 -> 2 channels from each end.
    g_anchor = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    # |g_a - g_c| largest at channels 2 and 5: they change with the context (action shared) -> masked
    g_context = g_anchor + torch.tensor([0.1, 0.2, 9.0, 0.3, 0.15, 7.0, 0.25, 0.12])
    # |g_a - g_p| smallest at channels 0 and 6: they do not change with the action (context shared) -> masked
    g_action = g_anchor + torch.tensor([0.0, 3.0, 2.0, 4.0, 5.0, 1.0, 0.01, 2.5])
    keep = gradient_mask(g_anchor, g_context, g_action, 0.25)
    assert keep.tolist() == [False, True, False, True, True, False, False, True]
    # the inverted reading (mask the smallest |g_a - g_c|: channels 0, 7, and the largest |g_a - g_p|: 4, 3) would
    # keep channel 2, which carries the context, and mask channel 3
    inverted = [False, True, True, False, False, True, True, False]
    assert keep.tolist() != inverted and keep[3] and not keep[2]
    # per token: each row (layer) gets its own thresholds; rate 0 masks nothing
    rows = gradient_mask(torch.stack([g_anchor, -g_anchor]), torch.stack([g_context, -g_context]),
                         torch.stack([g_action, -g_action]), 0.25)
    assert rows[0].tolist() == rows[1].tolist() == keep.tolist()
    assert gradient_mask(g_anchor, g_context, g_action, 0.0).all()


def test_layerwise_tokens_reach_each_layer():
    torch.manual_seed(0)
    model = ConditionedUNet(TINY).eval()
    from diffusers.models.resnet import ResnetBlock2D
    layers = [m for m in model.unet.modules() if isinstance(m, ResnetBlock2D)]
    assert model.n_layers == len(layers) == 8
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):     # registered after ours: sees the temb after injection
        layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[1].detach().clone()))
    x, t, subject = torch.randn(2, 1, 16, 16), torch.tensor([3, 40]), torch.tensor([1, NULL_SUBJECT])
    dim = model.dim
    with torch.no_grad():
        model(x, t, subject, torch.zeros(2, model.n_layers, dim))
        base = dict(seen)
        tokens = torch.randn(2, model.n_layers, dim)
        model(x, t, subject, tokens)
    for i in range(model.n_layers):
        torch.testing.assert_close(seen[i] - base[i], tokens[:, i], atol=1e-5, rtol=0)
    # a layer-wise identifier gets a gradient in every row; the single token is shared by all layers
    ident = Identifier(torch.zeros(dim), model.n_layers, layerwise=True)
    model(x, t, subject, ident(2)).square().mean().backward()
    assert (ident.tokens.grad.abs().sum(1) > 0).all()
    single = Identifier(torch.zeros(dim), model.n_layers, layerwise=False)
    assert single.tokens.shape == (1, dim) and single(2).shape == (2, model.n_layers, dim)
    # a word gives the same token to every layer, equal to a single identifier started from it
    word = model.word_tokens(torch.tensor([NULL_ACTION]))
    start = Identifier(model.action_words.weight[NULL_ACTION], model.n_layers, layerwise=False)
    torch.testing.assert_close(start(1), word)


@pytest.mark.parametrize("layerwise,mask_rate", [(True, 0.25), (False, None)])
def test_inversion_leaves_model_weights_bit_identical(layerwise, mask_rate):
    torch.manual_seed(0)
    model = ConditionedUNet(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = Exemplars(torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([1, 1, 7, 7]))
    ident, losses = invert(model, ex, InversionConfig(layerwise, mask_rate, steps=2, batch=2), seed=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert len(losses) == 2
    assert not torch.equal(ident.tokens[0], model.action_words.weight[NULL_ACTION])   # the identifier moved


def test_triples_share_what_they_should():
    items = torch.randn(6, 1, 16, 16)
    ex = Exemplars(items, torch.tensor([1, 1, 1, 7, 7, 7]))
    anchor, context, action = _triples(ex, 16, torch.Generator().manual_seed(0))
    for a, c, p in zip(anchor, context, action):
        ia = next(i for i in range(6) if torch.equal(transform(items[i], TARGET), a))
        ic = next(i for i in range(6) if torch.equal(transform(items[i], TARGET), c))
        assert ex.labels[ia] != ex.labels[ic]                             # same action, other subject
        assert any(torch.equal(transform(items[ia], k), p) for k in (0, 2, 3))     # same item, other action
        assert not torch.equal(p, a)


def test_actions():
    x = torch.tensor([[1, 2], [3, 4]])
    assert transform(x, 1).tolist() == [[3, 1], [4, 2]]                   # clockwise
    assert transform(x, 2).tolist() == [[2, 4], [1, 3]]
    assert transform(x, 3).tolist() == [[3, 4], [1, 2]]


def test_toy_quick(tmp_path):
    from vitlab.agents import run_toy
    metrics = run_toy("adi", tmp_path, seed=0, quick=True)["metrics"]
    for arm in ("adi", "layerwise", "textual_inversion", "null_word", "target_word"):
        for key in ("action", "subject", "both"):
            assert 0.0 <= metrics[f"{arm}_{key}"] <= 1.0
    assert (tmp_path / "metrics.json").exists()
