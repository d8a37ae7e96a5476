"""The shift-add CPU kernel (vitlab/quant/shift_kernel.py): exact integer arithmetic against torch's own integer
shift ops, the layer against the float simulation it replaces (within the truncation bound), a whole shift model
through it, and bad input refused by name."""
import pytest
import timm
import torch
import torch.nn as nn

import vitlab
from vitlab.quant.shiftadd import ShiftAdd, ShiftLinear, round_to_fixed
from vitlab.quant.shift_kernel import ShiftKernelLinear, shift_kernel_, shift_matmul, to_fixed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_shift_matmul_equals_torch_integer_shifts():
    x = torch.randint(-2 ** 31, 2 ** 31 - 1, (7, 45), dtype=torch.int64).to(torch.int32)
    shifts = torch.randint(0, 15, (13, 45), dtype=torch.int32)
    sign = torch.randint(-1, 2, (13, 45), dtype=torch.int32)
    got = shift_matmul(x, shifts, sign)
    # oracle: torch's arithmetic right shift on int64, times the sign, summed (a multiplication here is fine)
    want = ((x.long().unsqueeze(1) >> shifts.long().unsqueeze(0)) * sign.long().unsqueeze(0)).sum(-1)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert (sign == 0).any() and (sign == -1).any() and (x < 0).any()      # every branch of the kernel ran


def test_to_fixed_is_round_to_fixed_in_integers():
    x = torch.cat([torch.randn(1000) * 100, torch.tensor([40000.0, -40000.0, 1e-9, -1e-9])])
    fixed = to_fixed(x)
    assert fixed.dtype == torch.int32
    torch.testing.assert_close(fixed.double() / 2 ** 16, round_to_fixed(x.double()), rtol=0, atol=0)


def test_kernel_layer_matches_the_float_simulation_within_the_truncation_bound():
    linear = nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight[0, :5] = 0.0                                          # zero weights: sign 0
    layer = ShiftLinear.from_linear(linear)
    kernel = ShiftKernelLinear.from_shift_linear(layer)
    x = torch.randn(3, 17, 96) * 4
    with torch.no_grad():
        want, got = layer(x), kernel(x)
    assert got.shape == want.shape == (3, 17, 40)
    bound = 96 * 2.0 ** -16 + 1e-4                                          # < one fixed-point unit per product
    diff = (got - want).abs().max().item()
    assert diff < bound
    assert diff > 0                                                          # the right shifts do truncate


def test_whole_shift_model_runs_through_the_kernel():
    model = timm.create_model("vl_test_vit", num_classes=10).eval()
    vitlab.apply_(model, [ShiftAdd(attention=False, linears="shift")])
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        want = model(x)
    n_shift = sum(type(m) is ShiftLinear for m in model.modules())
    assert shift_kernel_(model) == n_shift > 0
    assert not any(type(m) is ShiftLinear for m in model.modules())
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_bad_input_is_refused_by_name():
    shifts, sign = torch.zeros(3, 8, dtype=torch.int32), torch.ones(3, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        shift_matmul(torch.zeros(2, 8, dtype=torch.int64), shifts, sign)
    with pytest.raises(ValueError, match=r"\(out, 8\)"):
        shift_matmul(torch.zeros(2, 8, dtype=torch.int32), shifts[:, :4], sign)
    with pytest.raises(ValueError, match="0..31"):
        shift_matmul(torch.zeros(2, 8, dtype=torch.int32), shifts - 1, sign)
    with pytest.raises(ValueError, match="-1, 0 and \\+1"):
        shift_matmul(torch.zeros(2, 8, dtype=torch.int32), shifts, sign * 2)
    with pytest.raises(ValueError, match="int32"):
        to_fixed(torch.zeros(3), integer_bits=20, fraction_bits=16)
