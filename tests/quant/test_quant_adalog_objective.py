"""AdaLog's search objective: the paper's / official code's layer-output error (vitlab.quant.logquant).

The official code (GoatWu/AdaLog, quant_layers/matmul.py and linear.py) scores log-base and scale candidates on the
output of the layer that consumes the quantized values: softmax·V for post-softmax, fc2 for post-GELU. These tests
check that vitlab's error functions compute exactly that error for the quantizer it ends up with, that the
searches then prefer a different (better for the output) candidate than the values' own MSE where the two
disagree, and that calibration of a model records the context and uses it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab.quant.logquant import (GELU_SHIFT, AdaLogQuantizer, fpcs_search, linear_output_error, matmul_output_error,
                                   search_adalog_base, self_error)


def _attention_with_heavy_rare_keys(seed: int = 0):
    """Post-softmax rows where rarely attended keys carry large values in V: the output objective must keep the
    small probabilities that the values' own MSE is happy to round to zero."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.linspace(0, -6, 50)
    a = (torch.randn(4, 2, 50, 50, generator=g) * 2 + bias).softmax(-1)
    v = torch.randn(4, 2, 50, 16, generator=g) * torch.exp(-bias)[:, None] / 50
    return a, v


def _gelu_rows_where_small_channels_matter(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = F.gelu(torch.randn(256, 64, generator=g) * 2)
    w = torch.randn(32, 64, generator=g) * 0.1
    x[:, 16:] *= 0.02                         # the channels the Linear reads are the small ones
    w[:, :16] = 0
    w[:, 16:] *= 20
    return x, w


def test_matmul_output_error_is_the_softmax_v_error_of_the_quantizer():
    a, v = _attention_with_heavy_rare_keys()
    vq = v.round()                                           # any "quantized V"
    fn = matmul_output_error(a, v, vq, bits=4)
    quantizer = AdaLogQuantizer(4, site="attn_prob")
    quantizer.q.fill_(21.0)
    quantizer.calibrated = True
    quantizer.set_mode("quant")
    expected = ((quantizer(a) @ vq - a @ v) ** 2).mean()
    got = fn(torch.tensor([1.0]), torch.tensor([21.0]))
    torch.testing.assert_close(got, expected.reshape(1), rtol=1e-5, atol=1e-9)


def test_linear_output_error_is_the_fc2_error_of_the_shifted_quantizer():
    x, w = _gelu_rows_where_small_channels_matter()
    wq = (w * 8).round() / 8
    fn = linear_output_error(x, w, wq, GELU_SHIFT, bits=4)
    quantizer = AdaLogQuantizer(4, site="post_gelu")
    quantizer.shift.fill_(GELU_SHIFT)
    quantizer.scale.fill_(1.5)
    quantizer.q.fill_(18.0)
    quantizer.calibrated = True
    quantizer.set_mode("quant")
    expected = ((F.linear(quantizer(x), wq) - F.linear(x, w)) ** 2).mean()
    got = fn(torch.tensor([1.5]), torch.tensor([18.0]))
    torch.testing.assert_close(got, expected.reshape(1), rtol=1e-5, atol=1e-9)


def test_post_softmax_output_search_beats_self_search_on_the_output():
    a, v = _attention_with_heavy_rare_keys()
    out_fn = matmul_output_error(a, v, None, bits=4)
    q_out = int(search_adalog_base(a.flatten(), 4, error_fn=out_fn)[0])
    q_self = int(search_adalog_base(a.flatten(), 4)[0])
    assert q_out != q_self                                   # the objectives disagree on this data ...
    e_out, e_self = out_fn(torch.ones(2), torch.tensor([float(q_out), float(q_self)]))
    assert e_out < 0.5 * e_self                              # ... and the output one wins by > 2x on the output
    qs = torch.arange(10, 138).float()                       # exhaustive: nothing in the range is better
    assert e_out <= out_fn(torch.ones_like(qs), qs).min() + 1e-12


def test_post_gelu_fpcs_with_output_objective_beats_self_objective_on_the_output():
    x, w = _gelu_rows_where_small_channels_matter()
    out_fn = linear_output_error(x, w, None, GELU_SHIFT, bits=4)
    data = x.flatten() + GELU_SHIFT
    s_out, q_out = fpcs_search(data, 4, error_fn=out_fn)
    s_self, q_self = fpcs_search(data, 4)
    e_out, e_self = out_fn(torch.tensor([s_out, s_self]), torch.tensor([float(q_out), float(q_self)]))
    assert e_out < 0.9 * e_self
    assert self_error(data, 4)(torch.tensor([s_self]), torch.tensor([float(q_self)])) <= \
        self_error(data, 4)(torch.tensor([s_out]), torch.tensor([float(q_out)]))   # each wins on its own objective


@pytest.mark.parametrize("objective", ["output", "self"])
def test_calibrating_a_model_records_context_and_uses_the_objective(tiny_model, objective):
    import vitlab
    from vitlab.quant import PTQ
    from vitlab.runner import model_input_size

    torch.manual_seed(0)
    calib = [torch.randn(8, *model_input_size(tiny_model)) for _ in range(2)]
    model = vitlab.apply_(tiny_model.eval(), PTQ(w=4, a=4, quantizer="adalog", objective=objective), calib=calib)
    adalogs = {n: m for n, m in model.named_modules() if isinstance(m, AdaLogQuantizer)}
    assert adalogs and {n.rsplit(".", 1)[-1] for n in adalogs} == {"attn_prob_quant", "input_quant"}
    for name, q in adalogs.items():
        assert q.searched_with == objective, name
        assert (q._context is not None) == (objective == "output"), name
        assert not any("context" in k for k in q.state_dict())
    if objective == "output":
        attn = model.blocks[0].attn
        ctx = attn.attn_prob_quant._context
        assert ctx["a"].shape[0] == 16 and ctx["v"].shape[0] == 16   # both batches' images, up to 32
        assert ctx["v_quant"] is attn.v_quant and attn.v_quant.calibrated
        fc2 = model.blocks[0].mlp.fc2
        assert fc2.input_quant._context["layer"] is fc2
        assert fc2.input_quant._context["x"].shape[1] == fc2.in_features
    with torch.no_grad():
        assert torch.isfinite(model(calib[0])).all()


def test_bad_objective_is_refused_with_the_choices():
    from vitlab.quant import PTQ
    from vitlab.techniques import TechniqueError, parse_apply

    assert parse_apply(["ptq:w=4,a=4,quantizer=adalog,objective=self"])[0].objective == "self"
    assert PTQ().objective == "output"
    with pytest.raises(TechniqueError, match="objective='foo' is not one of output, self"):
        parse_apply(["ptq:objective=foo"])

    with pytest.raises(ValueError, match="objective='mse'.*'output'.*'self'"):
        PTQ(quantizer="adalog", objective="mse")
    with pytest.raises(ValueError, match="objective='x' is not one of output, self"):
        AdaLogQuantizer(4, site="attn_prob", objective="x")
