"""The Pareto lab on a dense model: its task metric (mIoU here) takes top-1's place in selection, the test column,
the report and results.csv; mismatched data is refused before any point is measured."""
import csv
import json

import pytest
import torch

from vitlab.bench.measure import measure
from vitlab.pareto import SweepConfig, SweepError, run_sweep

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

from test_dense_core import needs_data  # noqa: E402  (same data guard as the other dense tests)

SCENES = "fmnist-scenes:n=16"


@pytest.fixture(scope="module")
def semantic(tmp_path_factory):
    from vitlab.cli import main

    out = tmp_path_factory.mktemp("dense") / "sem"
    torch.set_num_threads(1)
    assert main(["train", "--task", "semantic", "--head", "semantic-fpn", "--model", "vl_test_vit", "--data", SCENES,
                 "--steps", "3", "--batch-size", "4", "--no-progress", "--out", str(out)]) == 0
    return out


@needs_data
def test_sweep_selects_on_the_task_metric(semantic, tmp_path):
    cfg = SweepConfig(source=str(semantic), out=str(tmp_path / "p"), data=SCENES, techniques=["ptq"],
                      min_time_s=0.02, memory=False, threads=1, confirm_rounds=0)
    result = run_sweep(cfg, progress=False, log=lambda *_: None)
    rows = {r["techniques"]: r for r in result["rows"]}
    assert set(rows) == {"none", "ptq"} and all(r["status"] == "ok" for r in rows.values()), result["rows"]
    for r in rows.values():
        assert r["metric"] == "miou" and r["val_top1"] is None and 0 <= r["val_score"] <= 1
    # the val score is vitlab measure's task metric on the val scenes (an independent route to the same number)
    (m,) = measure(str(semantic), data=SCENES, split="val", threads=1, min_time_s=0.02, memory=False)
    assert rows["none"]["val_score"] == pytest.approx(m.task_score, abs=1e-9)
    assert rows["ptq"]["drop_pt"] == pytest.approx(100 * (rows["none"]["val_score"] - rows["ptq"]["val_score"]))
    base = rows["none"]
    assert 0 <= base["test_score"] <= 1 and base["n_test"] > 0 and "test_top1" not in base
    assert any("patch-drop robustness measures classifiers" in n for n in result["notes"])
    assert not any("robust_top1" in r for r in rows.values())

    page = (tmp_path / "p" / "report.html").read_text()
    assert "val mIoU %" in page and "test mIoU %" in page and "val top-1" not in page and "patches dropped" not in page
    with open(tmp_path / "p" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["metric"] for r in table} == {"miou"} and all(r["val_top1"] == "" for r in table)
    saved = json.loads((tmp_path / "p" / "results.json").read_text())
    assert saved["base"] == base["key"]


@needs_data
def test_default_stacks_of_a_dense_model(semantic):
    from vitlab.dense.engine import load_dense
    from vitlab.pareto.plan import default_stacks

    base, candidates, notes = default_stacks(load_dense(semantic))
    assert ("w8a8",) in base and ("ptq:w=4,a=4,quantizer=adalog",) in base
    assert not any(t.startswith(("tome", "evit")) for stack in base for t in stack)
    assert any("no dense head has been checked with reduced tokens" in n for n in notes)


@needs_data
def test_sweep_refuses_mismatched_data(semantic, tmp_path):
    with pytest.raises(SweepError, match="is a dense checkpoint: give --data with scenes"):
        run_sweep(SweepConfig(source=str(semantic), out=str(tmp_path / "a"), data="fashion-mnist"), progress=False)
    with pytest.raises(SweepError, match="holds scenes for dense models, but vl_test_vit is a classifier"):
        run_sweep(SweepConfig(source="vl_test_vit", out=str(tmp_path / "b"), data=SCENES), progress=False)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
