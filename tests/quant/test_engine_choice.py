"""engine=auto picks the int8 engine by a timed trial on this machine (cached per CPU, model, batch and threads),
or by the ISA rule with the trial off; every row records the choice. The tests hold on any CPU: they check that the
choice follows the measured timings and the flags, not which engine wins here."""
import copy
import json

import pytest
import torch

import vitlab
from vitlab.quant import W8A8
from vitlab.quant import engine_choice as ec
from vitlab.quant import deploy
from vitlab.quant.deploy import OnnxRuntimeRunner, OpenVINORunner


def _calib(n=32, seed=1):
    return [torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_vit", num_classes=10).eval()


pytestmark = pytest.mark.usefixtures("engine_sandbox")   # tests/conftest.py


def _fake_timings(monkeypatch, ms):
    calls = []

    def fake(runners, images, rounds):
        calls.append((sorted(runners), tuple(images.shape)))
        return {e: ms[e] for e in runners}

    monkeypatch.setattr(ec, "_time", fake)
    return calls


@pytest.mark.parametrize("winner", ["onnxruntime", "openvino"])
def test_auto_keeps_the_engine_the_trial_measured_fastest(model, monkeypatch, winner):
    loser = {"onnxruntime": "openvino", "openvino": "onnxruntime"}[winner]
    calls = _fake_timings(monkeypatch, {winner: 1.0, loser: 3.0})
    with ec.engine_trial(batch=8):
        runner = vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib())
    assert calls == [(["onnxruntime", "openvino"], (8, 1, 16, 16))]   # both engines, at the caller's batch
    assert isinstance(runner, OnnxRuntimeRunner if winner == "onnxruntime" else OpenVINORunner)
    choice = runner.engine_choice
    assert choice["engine"] == winner and choice["how"] == "trial" and choice["batch"] == 8
    assert choice["threads"] == 1 and choice["timings_ms"] == {winner: 1.0, loser: 3.0}
    assert choice["cpu_flags"] == vitlab.profiling.cpu_flags_text()


def test_real_trial_times_both_engines_and_keeps_the_faster(model):
    runner = vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib())
    t = runner.engine_choice["timings_ms"]
    assert set(t) == {"onnxruntime", "openvino"} and all(v > 0 for v in t.values())
    assert runner.engine_choice["engine"] == min(t, key=t.get)
    assert runner.engine_choice["batch"] == 32      # no caller batch: the calibration batch
    assert torch.isfinite(runner(torch.randn(4, 1, 16, 16))).all()


def test_choice_is_cached_per_cpu_model_batch_and_threads(model, monkeypatch):
    calls = _fake_timings(monkeypatch, {"onnxruntime": 2.0, "openvino": 1.0})
    with ec.engine_trial(batch=8):
        first = vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib())
        _fake_timings(monkeypatch, {"onnxruntime": 1.0, "openvino": 2.0})   # would flip the choice if re-timed
        again = vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib(seed=5))
    assert len(calls) == 1 and again.engine_choice["how"] == "cached"
    assert again.engine_choice["engine"] == first.engine_choice["engine"] == "openvino"
    assert isinstance(again, OpenVINORunner)
    cache = json.loads(ec.cache_path().read_text())
    assert list(cache) == [first.engine_choice["key"]] and cache[first.engine_choice["key"]]["engine"] == "openvino"
    # another batch, thread count, CPU flag set or model shape is another key: timed again
    with ec.engine_trial(batch=16):
        assert vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib()).engine_choice["how"] == "trial"
    with ec.engine_trial(batch=8):
        assert vitlab.deploy(copy.deepcopy(model), W8A8(threads=2), calib=_calib()).engine_choice["how"] == "trial"
        monkeypatch.setenv("VITLAB_CPU_FLAGS", "avx2")
        assert vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib()).engine_choice["how"] == "trial"
        monkeypatch.delenv("VITLAB_CPU_FLAGS")
        wide = vitlab.create_model("vl_test_vit", num_classes=10, embed_dim=64).eval()
        assert vitlab.deploy(wide, W8A8(threads=1), calib=_calib()).engine_choice["how"] == "trial"
    assert len(json.loads(ec.cache_path().read_text())) == 5


@pytest.mark.parametrize("flags,expected", [("avx2", "onnxruntime"), ("avx2 avx512f", "onnxruntime"),
                                            ("avx2 avx512f avx512_vnni", "openvino"), ("avx2 avx_vnni", "openvino"),
                                            ("avx2 avx512f amx_tile amx_int8", "openvino")])
def test_trial_off_uses_the_isa_rule(model, monkeypatch, flags, expected):
    calls = _fake_timings(monkeypatch, {"onnxruntime": 1.0, "openvino": 1.0})
    monkeypatch.setenv("VITLAB_CPU_FLAGS", flags)
    with ec.engine_trial(enabled=False):
        runner = vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib())
    assert not calls and runner.engine_choice["how"] == "rule" and runner.engine_choice["engine"] == expected
    monkeypatch.setenv("VITLAB_ENGINE_TRIAL", "off")   # the environment says the same
    assert vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib()).engine_choice["how"] == "rule"


def test_one_installed_engine_is_used_without_a_trial(model, monkeypatch):
    calls = _fake_timings(monkeypatch, {"onnxruntime": 1.0, "openvino": 1.0})
    monkeypatch.setattr(deploy, "installed_engines", lambda c: [e for e in c if e != "onnxruntime"])
    runner = vitlab.deploy(copy.deepcopy(model), W8A8(threads=1), calib=_calib())
    assert not calls and isinstance(runner, OpenVINORunner) and runner.engine_choice["how"] == "only"


def test_named_engine_skips_the_choice(model, monkeypatch):
    calls = _fake_timings(monkeypatch, {"onnxruntime": 1.0, "openvino": 1.0})
    runner = vitlab.deploy(copy.deepcopy(model), W8A8(engine="onnxruntime", threads=1), calib=_calib())
    assert not calls and runner.engine_choice is None and runner.engine == "onnxruntime-int8"


def test_bench_row_records_choice_and_cpu_flags(monkeypatch, capsys):
    from vitlab.cli import main

    monkeypatch.setenv("VITLAB_CPU_FLAGS", "avx2 avx512f avx512_vnni")
    assert main(["bench", "vl_test_vit", "--apply", "w8a8", "--data", "synthetic:n=64", "--calib-images", "32",
                 "--batch", "4", "--threads", "1", "--no-memory", "--min-time", "0.05", "--engine-trial", "off",
                 "--json"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out.strip().splitlines()[-1])
    assert row["cpu_flags"] == "avx2 avx512f avx512_vnni"
    assert row["engine_choice"]["how"] == "rule" and row["engine_choice"]["engine"] == "openvino"
    assert row["engine_choice"]["batch"] == 4 and row["engine"] == "openvino-int8"
    assert "engine=auto chose openvino (rule" in out


def test_bad_trial_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("VITLAB_ENGINE_TRIAL", "maybe")
    with pytest.raises(ValueError, match="VITLAB_ENGINE_TRIAL='maybe'"):
        ec.trial_settings()
    with pytest.raises(ValueError, match="batch=0"):
        with ec.engine_trial(batch=0):
            pass
