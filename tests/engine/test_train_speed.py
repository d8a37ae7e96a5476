"""Training engine flags (vitlab/engine/speed.py): --precision chosen by measurement, --compile with its eager
fallback, --channels-last; none changes what a float32 run computes beyond rounding."""
import json

import pytest
import torch
from safetensors.torch import load_file

from vitlab.engine import TrainConfig, fit
from vitlab.engine import speed
from vitlab.errors import UserError

KW = dict(model="vl_test_vit", data="synthetic:n=64,classes=4", epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0,
          hflip=0.0, eval_val=False, progress=False, threads=1)


def _weights(run):
    return load_file(run / "model.safetensors")


def _training(run):
    return json.loads((run / "config.json").read_text())["training"]


def test_bf16_refused_without_native_bf16(monkeypatch):
    monkeypatch.setenv("VITLAB_CPU_FLAGS", "avx2 fma")
    model = torch.nn.Linear(4, 2)
    with pytest.raises(UserError, match=r"no native bf16 \(flags: avx2\).*--precision fp32 or auto"):
        speed.choose_precision("bf16", model, lambda: model(torch.ones(1, 4)).sum(), torch.device("cpu"))
    assert speed.choose_precision("auto", model, lambda: model(torch.ones(1, 4)).sum(),
                                  torch.device("cpu"))[0] == "fp32"


@pytest.mark.parametrize("fp32_s, bf16_s, bf16_loss, expected", [
    (1.0, 0.5, 1.01, "bf16"),     # 2x faster, as accurate
    (1.0, 0.95, 1.0, "fp32"),     # 5 % faster: below BF16_MIN_SPEEDUP
    (1.0, 0.5, 1.2, "fp32"),      # faster but the loss moved 20 %
    (0.5, 1.0, 1.0, "fp32"),      # slower (small GEMMs on AMX)
])
def test_auto_keeps_bf16_only_when_measured_faster_and_close(monkeypatch, fp32_s, bf16_s, bf16_loss, expected):
    monkeypatch.setenv("VITLAB_CPU_FLAGS", "avx2 avx512f avx512_bf16 amx_bf16")
    calls = iter([(fp32_s, 1.0), (bf16_s, bf16_loss)])
    monkeypatch.setattr(speed, "_time_steps", lambda *a: next(calls))
    choice, how = speed.choose_precision("auto", torch.nn.Linear(2, 2), lambda: None, torch.device("cpu"))
    assert choice == expected and how["how"] == "trial" and how["bf16_speedup"] == pytest.approx(fp32_s / bf16_s, abs=1e-3)


def test_precision_trial_and_channels_last_do_not_change_a_float32_run(tmp_path, monkeypatch):
    """auto on a CPU without bf16 is fp32 without a trial; a CPU with bf16 runs the trial (forked RNG, gradients
    dropped), which must not change the float32 result at all; channels-last changes memory layout only, so its run
    differs by rounding alone (the conv kernels for the other layout sum in another order: 1.1e-5 after these four
    AdamW steps on an AVX-512 CPU without AMX, below 1e-5 on the AMX machine)."""
    plain = fit(TrainConfig(out=str(tmp_path / "plain"), **KW))
    monkeypatch.setenv("VITLAB_CPU_FLAGS", "avx2 avx512f avx512_bf16")
    monkeypatch.setattr(speed, "BF16_MIN_SPEEDUP", 1e9)              # the trial runs, and keeps fp32
    auto = fit(TrainConfig(out=str(tmp_path / "auto"), precision="auto", **KW))
    info = _training(auto)
    assert info["precision_used"] == "fp32" and info["precision_choice"]["how"] == "trial"
    a, b = _weights(plain), _weights(auto)
    assert all(torch.equal(a[k], b[k]) for k in a)
    nhwc = _weights(fit(TrainConfig(out=str(tmp_path / "nhwc"), channels_last=True, **KW)))
    assert all(torch.allclose(a[k], nhwc[k], atol=2e-4, rtol=1e-3) for k in a)


def test_bf16_run_trains_and_records_its_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CPU_FLAGS", "avx2 avx512f avx512_bf16")
    run = fit(TrainConfig(out=str(tmp_path / "bf16"), precision="bf16", **KW))
    assert _training(run)["precision_used"] == "bf16"
    w = _weights(run)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    def broken(module):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="no C.. compiler found.*training eagerly"):
        run = fit(TrainConfig(out=str(tmp_path / "c"), compile=True, **KW))
    info = _training(run)
    assert info["compiled"] is False and "no C++ compiler" in info["compile_error"]
    plain = fit(TrainConfig(out=str(tmp_path / "plain"), **KW))
    a, b = _weights(plain), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)                # the failed probe left no trace


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="--precision 'fp16'"):
        TrainConfig(out="x", model="vl_test_vit", precision="fp16").validate()


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path):
    """Inductor (needs a C++ compiler): the compiled forward trains the same model up to rounding."""
    run = fit(TrainConfig(out=str(tmp_path / "c"), compile=True, **KW))
    assert _training(run)["compiled"] is True
    plain = fit(TrainConfig(out=str(tmp_path / "plain"), **KW))
    a, b = _weights(plain), _weights(run)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
