"""Token-reduced models survive tracing exporters: OpenVINO's converter gives the PyTorch logits (it returned NaN
when the merge's in-place scatters into strided views were traced)."""
import torch

import vitlab


def test_tome_model_converts_to_openvino(tiny_model):
    import openvino as ov

    from vitlab.quant.deploy import ov_config

    model = vitlab.apply_(tiny_model, vitlab.parse_apply(["tome:r=2"]))
    from vitlab.runner import model_input_size

    torch.manual_seed(0)
    x = torch.randn(3, *model_input_size(model))
    with torch.no_grad():
        ref = model(x)
        converted = ov.convert_model(model, example_input=x[:1])
    out = torch.from_numpy(ov.Core().compile_model(converted, "CPU", ov_config(1))(x.numpy())[0])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
