"""NNCF's own default int8 (w8a8:calibration=nncf) as a comparison point: runs with synthetic and with real
calibration images, keeps the reference model's accuracy, and names the fix when NNCF is not installed."""
import copy
import json
import sys

import pytest
import torch

import vitlab
from vitlab.cli import main
from vitlab.quant import W8A8
from vitlab.quant.deploy import OpenVINORunner, fake_quant_ranges


def test_nncf_int8_with_synthetic_calibration():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    calib = [torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    runner = vitlab.deploy(copy.deepcopy(model), W8A8(calibration="nncf", threads=1), calib=calib)
    assert isinstance(runner, OpenVINORunner) and runner.engine == "openvino-int8" and runner.sim_module is None
    assert len(fake_quant_ranges(runner.ov_model)) >= 2 * 4     # NNCF put int8 quantizers on every block's matmuls
    x = torch.randn(8, 1, 16, 16)
    out = runner(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    with torch.no_grad():
        assert (out - model(x)).abs().max() > 0             # quantized, not the float graph


def test_nncf_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)          # import nncf -> ImportError
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    with pytest.raises(vitlab.TechniqueError, match=r"calibration=nncf needs NNCF: pip install nncf==3.4.0"):
        vitlab.deploy(model, W8A8(calibration="nncf"), calib=[torch.randn(4, 1, 16, 16)])


def test_nncf_int8_keeps_reference_accuracy_on_real_data(capsys):
    args = ["checkpoints/fashion-mnist-reference", "--data", "fashion-mnist", "--split", "val", "--limit", "512",
            "--calib-images", "128", "--threads", "2", "--json"]
    assert main(["eval", *args]) == 0
    flt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", *args, "--apply", "w8a8:calibration=nncf"]) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert q["n"] == flt["n"] == 512
    assert abs(q["top1"] - flt["top1"]) <= 0.02     # within 2 pt on 512 val images (measured: see BENCHMARKS.md)
