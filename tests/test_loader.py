"""One loader (`vitlab.loader.load`): every verb that loads a model with a technique stack goes through it, so what
`--apply` means, which images a calibrating stack sees and what a missing `--data` says are decided in one place."""
import pytest
import torch

import vitlab
from vitlab import loader
from vitlab.cli import main
from vitlab.techniques import applied_techniques

DATA = "synthetic:n=16,classes=10"


@pytest.fixture
def calls(monkeypatch):
    """The stacks `loader.load` was called with (the real loader still runs)."""
    seen, real = [], loader.load

    def spy(source, apply=(), **kwargs):
        seen.append([vitlab.format_technique(c) if not isinstance(c, str) else c for c in apply])
        return real(source, apply, **kwargs)

    monkeypatch.setattr(loader, "load", spy)
    monkeypatch.setenv("VITLAB_ENGINE_TRIAL", "off")
    return seen


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(path)
    return path


@pytest.mark.parametrize("argv", [
    ["bench", "vl_test_vit", "--apply", "tome:r=1", "--batch", "2", "--no-memory", "--min-time", "0.01"],
    ["measure", "vl_test_vit", "--apply", "tome:r=1", "--data", DATA, "--batch", "2", "--no-memory",
     "--min-time", "0.01"],
    ["eval", "vl_test_vit", "--apply", "tome:r=1", "--data", DATA, "--split", "val", "--limit", "4"],
    ["explain", "vl_test_vit", "--apply", "tome:r=1", "--method", "rollout"],
    ["predict", "vl_test_vit", "--apply", "tome:r=1"],
    ["quantize", "vl_test_vit", "--apply", "ptq", "--data", DATA, "--calib-images", "4"],
    ["prune", "vl_test_vit", "--target-flops", "0.8", "--importance", "l1"],
], ids=lambda argv: argv[0])
def test_every_verb_loads_through_the_loader(argv, calls, image, tmp_path):
    if argv[0] in ("explain", "predict"):
        argv = argv[:2] + (["--image", str(image), "--out", str(tmp_path / "e.png")] if argv[0] == "explain"
                           else [str(image)]) + argv[2:]
    if argv[0] in ("quantize", "prune"):
        argv = argv + ["--out", str(tmp_path / "out")]
    assert main(argv) == 0
    expected = "ptq" if argv[0] == "quantize" else "prune" if argv[0] == "prune" else "tome"
    assert calls and any(c and c[0].startswith(expected) for c in calls), calls


def test_the_python_api_loads_through_the_loader(calls):
    rows = vitlab.measure("vl_test_vit", apply=["tome:r=1"], batch=2, memory=False, min_time_s=0.01)
    assert rows and calls == [["tome:r=1"]]


def test_a_calibrating_stack_without_data_names_the_flag():
    with pytest.raises(ValueError, match="ptq calibrates on images: give --data SPEC"):
        loader.load("vl_test_vit", ["ptq"])
    model = loader.load("vl_test_vit", ["ptq"], calibration=loader.Calibration(DATA, images=4))
    assert applied_techniques(model)[0].__class__.__name__ == "PTQ"


def test_calibration_is_refused_on_the_test_split():
    with pytest.raises(ValueError, match="test split is refused.*--split train"):
        loader.load("vl_test_vit", ["ptq"], calibration=loader.Calibration(DATA, split="test", split_flag="--split"))


def test_a_model_is_changed_in_place_and_returned():
    model = vitlab.create_model("vl_test_vit")
    assert loader.load(model, ["tome:r=1"]) is model and applied_techniques(model)


def test_deploy_gives_a_runner_and_leaves_the_model_as_it_was(tiny_model):
    """`vitlab.deploy` is the verb for engine techniques: the runner computes the int8 model, while the model passed
    in keeps its float weights, no quantizers and its own technique stack; `apply_` refuses to deploy."""
    from vitlab.quant import W8A8, is_quantized

    model = tiny_model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(vitlab.TechniqueError, match=r"w8a8.*vitlab\.deploy\(model, 'w8a8"):
        vitlab.apply_(model, W8A8(engine="onnxruntime", threads=1), calib=[x])
    runner = vitlab.deploy(model, W8A8(engine="onnxruntime", threads=1), calib=[torch.randn(16, 1, 16, 16)])
    assert isinstance(runner, vitlab.Runner) and runner.engine == "onnxruntime-int8"
    assert runner.techniques[-1] == W8A8(engine="onnxruntime", threads=1)
    assert not is_quantized(model) and applied_techniques(model) == ()
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        ref = model(x)
    assert 0 < (runner(x) - ref).abs().max() < 0.5 * ref.abs().max()   # int8: close to the float model, not equal
    with pytest.raises(ValueError, match="calib=\\[image batches\\]"):
        vitlab.deploy(model, "w8a8")


def test_deploy_of_a_pytorch_stack_is_a_torch_runner_of_the_changed_model(tiny_model):
    runner = vitlab.deploy(tiny_model.eval(), ["tome:r=1"])
    assert isinstance(runner, vitlab.TorchRunner) and runner.module is tiny_model
    assert [vitlab.format_technique(t) for t in applied_techniques(tiny_model)] == ["tome:r=1"]
