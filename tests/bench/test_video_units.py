"""Throughput units: every measurement of a video model counts clips per second, carried in the result (`unit`, from
the runner's item shape) through `vitlab measure` / `vitlab bench`, the Pareto sweep's rows, its CSV and its report;
an image model still counts images."""
import csv
import json
from types import SimpleNamespace

import pytest
import torch

import vitlab
from vitlab.bench.measure import CLIP_UNIT, IMAGE_UNIT, measure, print_rows, throughput_unit
from vitlab.checkpoint import save_checkpoint
from vitlab.pareto.report import columns, write_report
from vitlab.pareto.sweep import _write_csv, unit_label

FAST = dict(batch=2, memory=False, min_time_s=0.01, threads=1)


@pytest.fixture(autouse=True)
def no_engine_trial(monkeypatch):
    monkeypatch.setenv("VITLAB_ENGINE_TRIAL", "off")


def test_unit_follows_the_item_shape():
    assert throughput_unit(vitlab.create_model("vl_test_vivit_joint")) == CLIP_UNIT == "clips/s"
    assert throughput_unit(vitlab.create_model("vl_test_stprivacy")) == CLIP_UNIT
    assert throughput_unit(vitlab.create_model("vl_test_vit")) == IMAGE_UNIT == "img/s"


def test_measure_rows_and_table_of_a_video_checkpoint_say_clips(tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(vitlab.create_model("vl_test_vivit_joint"), tmp_path / "video")
    (video,) = measure(str(tmp_path / "video"), **FAST)
    (image,) = measure("vl_test_vit", **FAST)
    assert (video.unit, image.unit) == ("clips/s", "img/s")
    assert video.to_dict()["unit"] == "clips/s" and video.img_per_s > 0
    print_rows([video])
    out = capsys.readouterr().out
    assert "clips/s" in out and "per clip" in out and "img/s" not in out and "per image" not in out
    print_rows([image])
    out = capsys.readouterr().out
    assert "img/s" in out and "per image" in out and "clips/s" not in out
    print_rows([video, image])                                         # mixed: each cell names its unit
    out = capsys.readouterr().out
    assert "items/s" in out and " clips/s" in out and " img/s" in out


def test_cli_bench_json_carries_the_unit(capsys):
    from vitlab.cli import main

    for name, unit in (("vl_test_vivit_joint", "clips/s"), ("vl_test_vit", "img/s")):
        assert main(["bench", name, "--batch", "2", "--no-memory", "--min-time", "0.01", "--threads", "1",
                     "--json"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert json.loads(lines[-1])["unit"] == unit
        assert unit in "\n".join(lines[:-1])                           # the table's throughput column


def _rows(unit: str | None) -> list[dict]:
    """Two hand-made sweep rows (base and a ToMe point), as `run_sweep` writes them; `unit` None: a results.json
    written before rows carried a unit."""
    common = dict(status="ok", source="m", engine="torch", simulated=False, metric="top1", batch=4, params=10**5,
                  macs=10**7, peak_mem_mb=None, quant_mac_fraction=None, command="vitlab measure m")
    rows = [dict(common, key="base", role="base", apply=[], techniques="none", val_score=0.9, test_score=0.89,
                 img_per_s=100.0, latency_ms=2.0, speedup=1.0, drop_pt=0.0, on_front=False),
            dict(common, key="tome", role="tokens", apply=["tome:r=8"], techniques="tome:r=8", val_score=0.899,
                 test_score=None, img_per_s=150.0, latency_ms=1.5, speedup=1.5, drop_pt=0.1, on_front=True,
                 recommended=True)]
    if unit is not None:
        for r in rows:
            r["unit"] = unit
    return rows


@pytest.mark.parametrize("unit,expected,other", [("clips/s", "clips/s", "img/s"), ("img/s", "img/s", "clips/s"),
                                                 (None, "img/s", "clips/s")])
def test_pareto_table_csv_and_report_name_the_unit(tmp_path, unit, expected, other):
    rows = _rows(unit)
    assert unit_label(rows) == expected
    assert [h for h, key, *_ in columns("top-1", unit_label(rows)) if key == "img_per_s"] == [expected]
    _write_csv(tmp_path / "results.csv", rows)
    with open(tmp_path / "results.csv") as f:
        assert [r["unit"] for r in csv.DictReader(f)] == [unit or ""] * 2
    cfg = SimpleNamespace(out=str(tmp_path), source="m", data="synthetic", batch=4)
    page = write_report(cfg, rows, {"base": "base", "recommended": "tome", "max_drop_pt": 0.5, "complete": True})
    text = page.read_text()
    assert f"100 {expected}, " in text and f"150 {expected} = <b>1.50x" in text     # summary: base, recommendation
    assert f">{expected}</th>" in text and other not in text
    items = "clips/s" if expected == "clips/s" else "images/s"
    assert f"throughput, {items} (batch 4)" in text                                 # the plot's x axis (svg text)
