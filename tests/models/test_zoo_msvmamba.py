"""MSVMamba (vitlab/models/msvmamba.py) against the official code: the selective scan against the official reference
scan, a logits fixture, parameter counts, the multi-scale scan routes, interfaces."""
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.models import msvmamba
from vitlab.models.listing import count_params_meta
from vitlab.models.msvmamba import (MSVMamba, MultiScaleSS2D, SelectiveSSM, checkpoint_filter_fn, merge_down_routes,
                                    multiscale_routes, selective_scan, selective_scan_parallel,
                                    selective_scan_sequential)
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo" / "msvmamba"
COMMIT = "c39401918e94f11eb29e4932b901b3fd139f1377"

# exact counts of the official VSSM built from configs/ms_vssm/vssm_{nano,micro,tiny}_224_ms.yaml (1000 classes)
OFFICIAL_PARAMS = {
    "vl_msvmamba_nano": 6_864_136,    # yaml comment: 6.86M
    "vl_msvmamba_micro": 11_879_272,  # yaml comment: 11.88M
    "vl_msvmamba_tiny": 33_046_312,   # yaml comment: 33.08M, README 33M
}
SCANS = {"sequential": selective_scan_sequential, "parallel": selective_scan_parallel}


def _fixture():
    return official_fixture("msvmamba")


def _random_scan_inputs(length: int, groups: int = 2, channels: int = 8, d_state: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(2, channels, length, generator=g),
                delta=0.5 * torch.randn(2, channels, length, generator=g),
                A=-(0.1 + torch.rand(channels, d_state, generator=g)),
                B=torch.randn(2, groups, d_state, length, generator=g),
                C=torch.randn(2, groups, d_state, length, generator=g),
                D=torch.randn(channels, generator=g), delta_bias=0.3 * torch.randn(channels, generator=g))


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("scan", sorted(SCANS))
def test_scan_equals_the_official_reference_scan(scan):
    # official_scan.safetensors: kernels/selective_scan/test_selective_scan.py::selective_scan_ref on grouped inputs
    data = load_file(str(FIXTURES / "official_scan.safetensors"))
    fn = SCANS[scan]
    got = fn(data["u"], data["delta"], data["A"], data["B"], data["C"], data["D"], data["delta_bias"], True)
    torch.testing.assert_close(got, data["out"], atol=1e-5, rtol=0)
    plain = fn(data["u"], data["delta"].abs(), data["A"], data["B"], data["C"], delta_softplus=False)
    torch.testing.assert_close(plain, data["out_plain"], atol=1e-5, rtol=0)


def test_parallel_scan_equals_sequential_values_and_gradients():
    inputs = _random_scan_inputs(333)  # not a power of two: the last prefix step is partial
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    want = selective_scan_sequential(**leaves)
    want_grads = torch.autograd.grad(want.square().sum(), list(leaves.values()))
    got = selective_scan_parallel(**leaves)
    got_grads = torch.autograd.grad(got.square().sum(), list(leaves.values()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-4)


def test_scan_is_causal_and_ungrouped_b_c_is_one_group():
    inputs = _random_scan_inputs(40, groups=1)
    y = selective_scan_parallel(**inputs)
    later = dict(inputs, u=inputs["u"].clone())
    later["u"][..., 25:] += 1.0
    y_later = selective_scan_parallel(**later)
    torch.testing.assert_close(y_later[..., :25], y[..., :25])  # outputs before position 25 cannot see it
    assert (y_later[..., 25:] - y[..., 25:]).abs().min() > 0
    three_d = dict(inputs, B=inputs["B"][:, 0], C=inputs["C"][:, 0])  # mamba's (Bt, N, L) form
    torch.testing.assert_close(selective_scan_parallel(**three_d), y)


def test_cpu_tensors_never_take_the_cuda_kernel(monkeypatch):
    called = []
    monkeypatch.setattr(msvmamba, "_mamba_kernel", lambda: called.append(1) or (lambda *a: None))
    inputs = _random_scan_inputs(9)
    torch.testing.assert_close(selective_scan(**inputs), selective_scan_parallel(**inputs))
    assert not called


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: enough to reach the kernel branch of `selective_scan`."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_cuda_tensors_take_the_mamba_kernel_when_installed(monkeypatch):
    # the branch only (mamba_ssm's kernel needs CUDA): it receives mamba's argument order, z=None
    calls = []
    monkeypatch.setattr(msvmamba, "_mamba_kernel", lambda: lambda *args: calls.append(args) or "kernel output")
    inputs = _random_scan_inputs(9)
    u = inputs["u"].as_subclass(_CudaLooking)
    assert selective_scan(u, inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                          inputs["delta_bias"], True) == "kernel output"
    (args,) = calls
    assert len(args) == 9 and args[6] is None and args[7] is inputs["delta_bias"] and args[8] is True
    torch.testing.assert_close(args[3], inputs["B"])
    monkeypatch.setattr(msvmamba, "_mamba_kernel", lambda: None)  # not installed: the parallel scan
    torch.testing.assert_close(selective_scan(u, **{k: v for k, v in inputs.items() if k != "u"}),
                               selective_scan_parallel(**inputs))


def test_logits_match_official_code():
    meta, x, logits, official_state = _fixture()
    assert meta["commit"] == COMMIT and x.shape[-2:] == (40, 72)
    model = MSVMamba(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_msvmamba"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture()
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    overlay = dict(file=str(path))
    kwargs = {k: v for k, v in meta["vitlab_kwargs"].items() if k != "num_classes"}
    model = vitlab.create_model("vl_test_msvmamba", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_msvmamba", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay,
                               **kwargs).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight,
                               official_state["patch_embed.0.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture()
    assert_official_file_converts(tmp_path, "vl_test_msvmamba", {"model": official_state},
                                  checkpoint_filter_fn, x, logits, **meta["vitlab_kwargs"])


def test_routes_one_full_resolution_and_three_half_resolution_orders():
    full = torch.arange(12.0).view(1, 1, 3, 4)
    down = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    seq_full, seq_down = multiscale_routes(full, down)
    assert seq_full.tolist() == [[list(range(12))]]  # raster: row by row
    assert seq_down.tolist() == [[[5, 4, 3, 2, 1, 0] + [0, 3, 1, 4, 2, 5] + [5, 2, 4, 1, 3, 0]]]
    # merging is the routes' adjoint: every half-resolution position comes back once from each of the three routes
    y = torch.randn(2, 5, 7, 9)
    _, routes = multiscale_routes(torch.zeros(2, 5, 1, 1), y)
    torch.testing.assert_close(merge_down_routes(routes.transpose(1, 2), 7, 9), 3 * y)


def test_mixer_scans_full_grid_once_and_three_half_routes_in_one_sequence(monkeypatch):
    torch.manual_seed(0)
    mixer = MultiScaleSS2D(16, d_state=2).eval()
    lengths = []
    monkeypatch.setattr(SelectiveSSM, "forward", lambda self, x, f=SelectiveSSM.forward:
                        lengths.append((self is mixer.ssm_full, x.shape[-1])) or f(self, x))
    with torch.no_grad():
        assert mixer(torch.randn(2, 7, 10, 16)).shape == (2, 7, 10, 16)
    assert lengths == [(True, 7 * 10), (False, 3 * 4 * 5)]  # stride-2 7x7 conv: 7 x 10 -> 4 x 5


def test_half_resolution_state_runs_on_from_one_route_into_the_next():
    # one scan over the concatenated routes: the second route's first output depends on the first route's inputs
    torch.manual_seed(0)
    ssm = SelectiveSSM(8, d_state=2, dt_rank=1).eval()
    x = torch.randn(1, 8, 3 * 6)
    shifted = x.clone()
    shifted[..., :6] += 1.0  # the first route only
    with torch.no_grad():
        assert (ssm(shifted)[..., 6] - ssm(x)[..., 6]).abs().max() > 1e-4


@pytest.mark.slow
def test_macs_at_224_match_the_official_count():
    # fvcore on the official VSSM (flop_count with the supported_ops of VSSM.flops(), run on CPU): Nano 0.8830G =
    # conv 0.3284 + linear 0.4778 + einsum (x_proj, dt_proj) 0.0362 + SelectiveScan hook 0.0186 + layer_norm
    # 0.0167 + upsample 0.0042 + pool 0.0011; count_flops sees the first three (the scan is element-wise here)
    with torch.device("meta"):
        model = vitlab.create_model("vl_msvmamba_nano")
    macs = count_flops(model.to_empty(device="cpu").eval(), torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / (0.3284 + 0.4778 + 0.0362) / 1e9 - 1) < 5e-4, macs
    scan = sum(depth * (9 * length * hidden + length * hidden)  # the official hook: 9 L E N + L E, N = 1
               for depth, side, hidden in zip((1, 2, 5, 2), (56, 28, 14, 7), (96, 192, 384, 768))
               for length in (side * side, 3 * ((side + 1) // 2) ** 2))
    assert abs(scan / 0.0186e9 - 1) < 5e-3, scan


def test_features_only_and_odd_input_sizes():
    x = torch.randn(2, 3, 72, 40)  # grids 18 x 10 -> 9 x 5 -> 5 x 3 -> 3 x 2
    features = timm.create_model("vl_test_msvmamba", features_only=True).eval()
    assert features.feature_info.channels() == [32, 64, 128, 256]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        assert [tuple(f.shape) for f in features(x)] == [(2, 32, 18, 10), (2, 64, 9, 5), (2, 128, 5, 3),
                                                         (2, 256, 3, 2)]
    model = vitlab.create_model("vl_test_msvmamba", num_classes=5).eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 256)
