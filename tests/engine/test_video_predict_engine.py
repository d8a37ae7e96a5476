"""`vitlab train --task predict` / `vitlab eval` of prediction checkpoints (vitlab.engine.video_predict): the metrics
against hand computations, exact resume after an interruption, the CLI path and its refusals."""
import json

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab.cli import main
from vitlab.engine.video_predict import (PredictTrainConfig, evaluate_predict, fit_predict, is_predict_checkpoint,
                                         load_predictor)
from vitlab.errors import UserError

pytest.importorskip("torchmetrics")
DATA = "moving-fashion-mnist:clips=20,frames=4"


class _Clips(torch.utils.data.Dataset):
    """(input, target) pairs of random clips in [0, 1], (1, T, H, W); input == target."""

    def __init__(self, n: int = 5):
        g = torch.Generator().manual_seed(0)
        self.clips = torch.rand(n, 1, 3, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i):
        return self.clips[i], self.clips[i]


class _Zeros(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_metrics_match_hand_computation():
    data = _Clips()
    perfect = evaluate_predict(nn.Identity(), data, batch_size=2)
    assert perfect["mse"] == 0 and perfect["mae"] == 0 and perfect["ssim"] == pytest.approx(1.0, abs=1e-6)
    zeros = evaluate_predict(_Zeros(), data, batch_size=2)  # batches of 2, 2, 1: the sums must still be exact
    y = data.clips  # (n, C, T, H, W)
    per_frame = y.pow(2).sum(dim=(1, 3, 4))  # (n, T): squared error summed over a frame's pixels
    assert zeros["mse"] == pytest.approx(float(per_frame.mean()), rel=1e-5)
    assert zeros["mae"] == pytest.approx(float(y.sum(dim=(1, 3, 4)).mean()), rel=1e-5)
    assert zeros["mse_pixel"] == pytest.approx(float(y.pow(2).mean()), rel=1e-5)
    assert zeros["mse_per_frame"] == pytest.approx(per_frame.mean(dim=0).tolist(), rel=1e-5)
    assert zeros["n"] == 5 and zeros["ssim"] < 0.1


def test_resume_after_interruption_is_exact(tmp_path, monkeypatch):
    import vitlab.engine.video_predict as video_predict

    cfg = dict(model="vl_test_predformer", data=DATA, steps=4, batch_size=4, eval_every=2, threads=1, progress=False)
    fit_predict(PredictTrainConfig(out=str(tmp_path / "straight"), **cfg))

    def stop(name: str) -> None:
        if name == "predict-step-2":
            raise KeyboardInterrupt
    monkeypatch.setattr(video_predict, "kill_point", stop)
    with pytest.raises(KeyboardInterrupt):
        fit_predict(PredictTrainConfig(out=str(tmp_path / "resumed"), **cfg))
    monkeypatch.undo()
    fit_predict(resume=str(tmp_path / "resumed"))
    a, b = load_predictor(tmp_path / "straight"), load_predictor(tmp_path / "resumed")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and set(lines[-1]) >= {"val_mse", "val_mae", "val_ssim"}


def test_cli_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--task", "predict", "--data", DATA, "--model", "vl_test_convlstm", "--steps", "2",
                 "--batch-size", "4", "--threads", "1", "--no-progress", "--out", str(run)]) == 0
    assert is_predict_checkpoint(run) and vitlab.create_model(str(run)).num_frames == 4
    capsys.readouterr()
    assert main(["eval", str(run), "--limit", "3", "--json"]) == 0  # --data defaults to the run's own
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "predict" and result["data"] == DATA and result["n"] == 3
    assert len(result["mse_per_frame"]) == 4 and 0 < result["mse"] and -1 <= result["ssim"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["--data", "fashion-mnist"], "moving-fashion-mnist"),
    (["--data", DATA, "--mixup", "0.2"], "--mixup"),
    (["--data", DATA, "--model", "vl_test_vivit"], "not a frame predictor"),
    (["--data", "moving-fashion-mnist:clips=20,frames=5", "--model-kwargs", '{"num_frames": 4}'], "frames=4"),
])
def test_cli_refusals_name_the_problem(tmp_path, capsys, argv, message):
    base = ["train", "--task", "predict", "--model", "vl_test_predformer", "--steps", "1", "--no-progress",
            "--out", str(tmp_path / "r")]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(UserError, match="moving-fashion-mnist"):
        PredictTrainConfig(out=str(tmp_path / "x"), data="moving-fashion-mnist-cls").validate()


def test_cli_eval_applies_ptq_to_a_predictor(tmp_path, capsys):
    """--apply on a prediction checkpoint: ptq calibrates on input clips and the metrics stay close to fp32's."""
    run = tmp_path / "run"
    assert main(["train", "--task", "predict", "--data", DATA, "--model", "vl_test_predformer", "--steps", "2",
                 "--batch-size", "4", "--threads", "1", "--no-progress", "--out", str(run)]) == 0
    results = []
    for extra in ([], ["--apply", "ptq", "--calib-images", "4"]):
        capsys.readouterr()
        assert main(["eval", str(run), "--limit", "4", "--json"] + extra) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[1]["mse"] != results[0]["mse"]  # quantized
    assert results[1]["mse"] == pytest.approx(results[0]["mse"], rel=0.05)
