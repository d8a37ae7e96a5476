"""vitlab.profiling: FLOPs with attention/FFT counted (cross-checked against the math SDPA path), timing, memory."""
import json
import math
import os
import platform
import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from vitlab.profiling import (
    Timing, count_flops, environment, fft_macs, num_threads, peak_memory_mb, sdpa_math_backend, time_callable,
)


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224").eval()


def _reference_macs(model: nn.Module, *args) -> int:
    """Independent count: stock FlopCounterMode with attention decomposed into bmm by the math SDPA backend."""
    with sdpa_math_backend(), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops() // 2


# --- FLOPs ----------------------------------------------------------------------------------------------------

def test_deit_tiny_fused_attention_counted(deit_tiny):
    x = torch.randn(1, 3, 224, 224)
    fused = count_flops(deit_tiny, x)
    with torch.no_grad():
        reference = _reference_macs(deit_tiny, x)
    assert any("scaled_dot_product" in op for op in fused.by_op), fused.by_op  # the fused kernel really ran
    assert fused.macs == pytest.approx(reference, rel=1e-3)
    assert fused.flops == 2 * fused.macs
    assert sum(fused.by_op.values()) == fused.macs

    n, d, depth = 197, 192, 12  # tokens (196 patches + cls), width, blocks
    assert fused.attention_macs == depth * 2 * n * n * d  # q @ k.T and attn @ v, all heads together
    assert fused.macs == pytest.approx(1.26e9, rel=0.03)  # timm's published 1.3 GMACs (1.26 unrounded)


def test_deit_tiny_math_path_counts_the_same(deit_tiny):
    x = torch.randn(1, 3, 224, 224)
    fused = count_flops(deit_tiny, x)
    with sdpa_math_backend():
        math_path = count_flops(deit_tiny, x)
    assert "aten.bmm" in math_path.by_op and not any("scaled_dot" in op for op in math_path.by_op)
    assert math_path.macs == fused.macs
    assert math_path.attention_macs == fused.attention_macs  # bmm inside Attention modules is attributed


def test_vit_tiny_small_images_fused_equals_math():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    fused = count_flops(model, x)
    with torch.no_grad():
        reference = _reference_macs(model, x)
    assert fused.macs == pytest.approx(reference, rel=1e-3)
    n, d = 17, 192
    assert fused.attention_macs == 12 * 2 * n * n * d


def test_backward_counts_more_and_restores_state():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=2).train()
    x = torch.randn(1, 3, 32, 32)
    forward = count_flops(model, x)
    both = count_flops(model, x, backward=True)
    assert both.macs > 2 * forward.macs
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in both.by_op
    assert all(p.grad is None for p in model.parameters())  # grads put back
    assert model.training


def test_count_flops_restores_batchnorm_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = model[1].running_mean.clone()
    count = count_flops(model, torch.randn(2, 3, 8, 8) + 5)
    assert torch.equal(model[1].running_mean, before)
    assert count.by_op == {"aten.convolution": 2 * 4 * 3 * 9 * 6 * 6}


class _SpectralMixer(nn.Module):
    def forward(self, x):
        return torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho"), s=x.shape[-2:], norm="ortho")


def test_fft_counted():
    count = count_flops(_SpectralMixer(), torch.randn(1, 8, 16, 16))
    per_transform = 2.5 * 256 * math.log2(256)  # 16x16 = 256 points, 8 channels each way
    assert count.by_op == {"aten._fft_r2c": 8 * per_transform, "aten._fft_c2r": 8 * per_transform}
    assert count.macs == 2 * 8 * per_transform == 2 * fft_macs((1, 8, 16, 16), (2, 3), batch=8)
    assert count.attention_macs == 0


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


@pytest.mark.parametrize("make", [_SelfAttention, lambda: nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)])
def test_torch_fused_fast_paths_counted(make):
    model = make().eval()  # eval + no_grad: nn.MultiheadAttention takes its one-op fast path
    x = torch.randn(2, 10, 64)
    fused = count_flops(model, x)
    assert len(fused.by_op) == 1 and next(iter(fused.by_op)).startswith("aten._")  # the fast path really ran
    reference = _reference_macs(model, x)  # grad enabled: the slow, decomposed path
    assert fused.macs == reference
    assert fused.attention_macs == 2 * 2 * 10 * 10 * 64


def test_count_flops_rejects_bad_inputs(deit_tiny):
    with pytest.raises(TypeError, match="inputs must be a Tensor"):
        count_flops(deit_tiny, {"x": torch.randn(1, 3, 224, 224)})


# --- timing ---------------------------------------------------------------------------------------------------

def test_time_callable_stats():
    t = time_callable(lambda: time.sleep(0.002), warmup=1, min_runs=5, max_runs=20, min_time_s=0.02, max_time_s=2)
    assert isinstance(t, Timing)
    assert 5 <= t.runs <= 20 and t.warmup == 1
    assert 0.002 <= t.p10_s <= t.median_s <= t.p90_s


def test_time_callable_caps_and_counts_calls():
    calls = []
    t = time_callable(lambda: calls.append(1), warmup=2, min_runs=3, max_runs=7, min_time_s=100, max_time_s=100)
    assert t.runs == 7 and len(calls) == 2 + 7  # min_time_s unreachable: max_runs stops it
    with pytest.raises(ValueError, match="max_runs=2"):
        time_callable(lambda: None, min_runs=3, max_runs=2)


def test_num_threads_restores():
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with num_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with num_threads(None):
        assert torch.get_num_threads() == before


def test_environment_keys():
    env = environment()
    assert {"torch", "timm", "vitlab", "threads", "cpu", "python", "platform"} <= set(env)
    assert env["torch"] == torch.__version__ and env["timm"] == timm.__version__
    assert env["vitlab"] != "unknown" and env["threads"] == torch.get_num_threads()


# --- memory ---------------------------------------------------------------------------------------------------

def test_peak_memory_deit_tiny():
    report = peak_memory_mb("vitlab.profiling.memory:_demo_factory", {"name": "deit_tiny_patch16_224"},
                            (1, 3, 224, 224), threads=1, timeout_s=300)
    assert report["peak_rss_mb"] >= report["baseline_rss_mb"] > 0
    assert report["peak_delta_mb"] == pytest.approx(report["peak_rss_mb"] - report["baseline_rss_mb"])
    assert report["baseline_rss_mb"] > report["import_rss_mb"]  # building the model took memory
    assert report["threads"] == 1


def test_peak_memory_bad_factory_named():
    with pytest.raises(RuntimeError, match="no_such_factory"):
        peak_memory_mb("vitlab.profiling.memory:no_such_factory", {}, (1, 3, 32, 32), timeout_s=120)
    with pytest.raises(ValueError, match="not_a_factory_string"):
        peak_memory_mb("not_a_factory_string", {}, (1, 3, 32, 32))


_ALLOCATOR_PROBE = """
import ctypes, json, sys
import torch
from vitlab.profiling import allocator_state, environment, tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
state = tune_allocator() if sys.argv[1] == "tune" else allocator_state()
before = libc.mallinfo2().hblkhd          # bytes in mmapped blocks (some from imports, before any tuning)
big = torch.empty(16 << 20)               # 64 MiB: glibc's default serves it with mmap
print(json.dumps({"state": state, "env": environment()["allocator"], "mmapped": libc.mallinfo2().hblkhd - before}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only (a no-op elsewhere)")
@pytest.mark.parametrize("mode,env", [("tune", {}), ("default", {}), ("tune", {"VITLAB_ALLOCATOR": "default"})])
def test_tune_allocator_keeps_large_tensors_off_mmap(mode, env):
    """Tuned, a 64 MiB tensor comes from the heap (no mmapped block); by default, or opted out, glibc mmaps it."""
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["state"] == report["env"]
    if mode == "tune" and not env:
        assert report["state"].startswith("glibc tuned") and report["mmapped"] == 0
    else:
        assert report["state"].startswith("glibc default") and report["mmapped"] >= 64 << 20
