"""w8a8 on ONNX Runtime: vitlab's scales travel as QuantizeLinear / DequantizeLinear pairs, ONNX Runtime fuses them
into int8 matmuls, the engine agrees with the simulated twin, and the deployed model saves and reloads."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import vitlab
from vitlab.quant import W8A8, quantizers
from vitlab.quant.deploy import OnnxRuntimeRunner
from vitlab.runner import Runner


@pytest.fixture(scope="module")
def deployed():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    runner = vitlab.deploy(copy.deepcopy(model), W8A8(engine="onnxruntime", threads=1), calib=[_calib()])
    return model, runner


def _calib():
    return torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _x(n=64, seed=2):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_runner_settings(deployed):
    model, runner = deployed
    assert isinstance(runner, OnnxRuntimeRunner) and isinstance(runner, Runner)
    assert runner.engine == "onnxruntime-int8" and runner.techniques == (W8A8(engine="onnxruntime", threads=1),)
    assert runner.input_size == (1, 16, 16) and runner.num_classes == 10
    assert runner._session.get_session_options().intra_op_num_threads == 1


def test_graph_carries_vitlabs_scales_and_runs_int8_matmuls(deployed, tmp_path):
    _, runner = deployed
    graph = onnx.load_from_string(runner.onnx_model)
    consts = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    for node in graph.graph.node:  # exporters may also emit scales as Constant nodes
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    scales = sorted(consts[n.input[1]].item() for n in graph.graph.node
                    if n.op_type == "QuantizeLinear" and consts[n.input[1]].size == 1)
    expected = sorted(q.scale.item() for name, q in quantizers(runner.sim_module)
                      if not name.endswith("weight_quant") and q.scale.numel() == 1)
    # 2 blocks: 4 Linear inputs + q, k, softmax, v; + the inputs of the patch embedding's convs after its first
    assert len(scales) == len(expected) == 2 * (4 + 4) + 2
    np.testing.assert_allclose(scales, expected, rtol=1e-6)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(runner.onnx_model, opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") >= 2 * 4  # every Linear of the blocks runs as an int8 matmul


def test_engine_agrees_with_the_twin_and_with_openvino(deployed):
    model, runner = deployed
    x = _x(256, seed=3)
    with torch.no_grad():
        sim, flt = runner.sim_module(x), model(x)
    out = runner(x)
    assert (out.argmax(1) == sim.argmax(1)).float().mean().item() >= 0.99
    assert (out - sim).abs().max() <= 4 * (sim - flt).abs().max()  # the same bound the OpenVINO path meets
    # two engines running the same scales compute the same int8 model: they differ only where f32 rounding before a
    # quantizer flips a code by one step, a small part of the quantization error itself (measured 0.15 of it on an
    # AVX-512 VNNI CPU); a bound in units of that error holds whatever kernels the CPU's ISA selects
    ov = vitlab.deploy(copy.deepcopy(model), W8A8(engine="openvino", threads=1), calib=[_calib()])
    assert (out - ov(x)).abs().max() <= 0.5 * (sim - flt).abs().max()


def test_saved_runner_reloads(deployed, tmp_path):
    from vitlab.quant.export import save_quantized

    _, runner = deployed
    save_quantized(runner, tmp_path / "d")
    assert (tmp_path / "d" / "model.onnx").is_file()
    again = vitlab.create_model(tmp_path / "d")
    assert isinstance(again, OnnxRuntimeRunner) and again.techniques == runner.techniques
    x = _x()
    torch.testing.assert_close(again(x), runner(x), atol=1e-6, rtol=0)


def test_nncf_calibration_is_openvinos():
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    with pytest.raises(vitlab.TechniqueError, match="calibration=nncf"):
        vitlab.deploy(model, W8A8(engine="onnxruntime", calibration="nncf"), calib=[_x(8)])


def test_token_merged_model_runs_on_onnx_runtime_without_log_spam(capfd):
    """ToMe + w8a8 on ONNX Runtime: the shrinking token axis is dynamic in the graph; the runner must not print
    ORT's per-call "VerifyOutputSizes" shape warnings (it did in every Pareto run before log_severity_level=3)."""
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    runner = vitlab.deploy(model, vitlab.parse_apply(["tome:r=2", "w8a8:engine=onnxruntime,threads=1"]),
                           calib=[_calib()])
    out = runner(torch.randn(4, 1, 16, 16))
    assert runner.engine == "onnxruntime-int8" and out.shape == (4, 10) and torch.isfinite(out).all()
    assert "VerifyOutputSizes" not in capfd.readouterr().err
