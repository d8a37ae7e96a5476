"""The Pareto lab: front and recommendation on hand-made rows, the --techniques grammar, a sweep end to end with
resume, and the report in a real browser (headless Chromium)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitlab.pareto import TIMING_FIELDS, SweepConfig, SweepError, load_results, pareto_front, recommend, run_sweep
from vitlab.pareto.plan import parse_stacks
from vitlab.techniques import TechniqueError


def test_front_excludes_dominated_points():
    pts = [(0.90, 100), (0.89, 200), (0.88, 150), (0.91, 50), (0.85, 300), (0.80, 250)]
    # (0.88,150) is dominated by (0.89,200); (0.80,250) by (0.85,300)
    assert pareto_front(pts) == [True, True, False, True, True, False]


def test_front_ties():
    # exact duplicates do not dominate each other; equal accuracy and lower speed is dominated
    pts = [(0.9, 100), (0.9, 100), (0.9, 90), (0.95, 100)]
    assert pareto_front(pts) == [False, False, False, True]
    assert pareto_front([(0.9, 100), (0.9, 100)]) == [True, True]
    assert pareto_front([(0.9, 100), (None, 500)]) == [True, False]


def test_recommend_respects_budget_and_ties():
    pts = [(0.900, 100), (0.897, 250), (0.890, 400), (0.896, 250)]
    assert recommend(pts, 0.900, 0.005) == 1           # 0.890 is 1 pt below: out; tie at 250 -> more accurate
    assert recommend(pts, 0.900, 0.0) == 0
    assert recommend(pts, 0.900, 0.011) == 2
    assert recommend([(0.5, 10)], 0.9, 0.005) is None
    with pytest.raises(ValueError, match="max_drop"):
        recommend(pts, 0.9, -1)


def test_recommend_uses_the_accuracies_it_is_given():
    # selection must be on validation: a point that is best on test but not on val is not chosen
    val = [(0.90, 100), (0.88, 300), (0.899, 200)]
    test = [(0.90, 100), (0.90, 300), (0.85, 200)]
    assert recommend(val, 0.90, 0.005) == 2
    assert recommend(test, 0.90, 0.005) == 1


def test_parse_stacks_grammar():
    stacks = parse_stacks(["tome:r=4; evit:keep_rate=0.5", "tome:r=2"])
    assert stacks == [(), ("tome:r=4",), ("evit:keep_rate=0.5",), ("tome:r=2",)]
    assert parse_stacks(["none;tome:r=4;tome:r=4"]) == [(), ("tome:r=4",)]
    with pytest.raises(TechniqueError, match="one token-reduction method"):
        parse_stacks(["tome:r=4+evit"])
    with pytest.raises(TechniqueError, match="empty technique"):
        parse_stacks(["tome:r=4+"])
    with pytest.raises(TechniqueError):
        parse_stacks(["nosuch:x=1"])


def _cfg(tmp_path, name="sweep", **kw):
    return SweepConfig(source="vl_test_vit", out=str(tmp_path / name), data="synthetic:n=64,classes=10",
                       techniques=["tome:r=1; tome:r=2; evit:keep_rate=0.5"], min_time_s=0.02, memory=False,
                       threads=1, **kw)


def _stable(row):
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


def test_sweep_writes_report_and_resumes(tmp_path):
    full = run_sweep(_cfg(tmp_path, "full"), progress=False, log=lambda *_: None)
    assert [r["techniques"] for r in full["rows"]] == ["none", "tome:r=1", "tome:r=2", "evit:keep_rate=0.5"]
    assert all(r["status"] == "ok" for r in full["rows"])
    out = tmp_path / "full"
    for name in ("report.html", "results.json", "results.csv", "accuracy_vs_throughput.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 4 and any(r["on_front"] for r in data["rows"])
    assert sum(r["recommended"] for r in data["rows"]) <= 1
    # the front's points (only they) carry the patch-drop robustness column, in the report too
    for r in data["rows"]:
        assert (r.get("robust_top1") is not None) == bool(r["on_front"]), r["key"]
        if r["on_front"]:
            assert 0 <= r["robust_top1"] <= 1 and 0 <= r["robust_ece"] <= 1
    assert "of patches dropped" in (out / "report.html").read_text()
    # the report links a picture of the exported recommendation explaining validation images
    assert data["explanation"]["method"] in ("rollout", "gradcam"), data.get("notes")
    assert (out / "recommended-explanation.png").read_bytes()[:4] == b"\x89PNG"
    assert 'href="recommended-explanation.png"' in (out / "report.html").read_text()
    base = next(r for r in data["rows"] if r["techniques"] == "none")
    assert base["test_top1"] is not None and base["on_front"] in (True, False)
    # MACs fall as ToMe's r grows
    macs = {r["techniques"]: r["macs"] for r in data["rows"]}
    assert macs["tome:r=2"] < macs["tome:r=1"] < macs["none"]

    # a run killed after two points, then rerun, equals the uninterrupted run except timings
    part = run_sweep(_cfg(tmp_path, "part"), progress=False, log=lambda *_: None, _stop_after=2)
    assert len(part["rows"]) == 2 and len(load_results(tmp_path / "part")["rows"]) == 2
    messages = []
    resumed = run_sweep(_cfg(tmp_path, "part"), progress=False, log=messages.append)
    assert any("resuming: 2 of 4" in m for m in messages)
    for a, b in zip(resumed["rows"], full["rows"]):
        diff = {k: (a.get(k), b.get(k)) for k in set(_stable(a)) | set(_stable(b)) if a.get(k) != b.get(k)}
        assert not diff, f"{a['key']}: {diff}"

    # different settings in the same folder: refused with a clear error
    with pytest.raises(SweepError, match="different settings"):
        run_sweep(_cfg(tmp_path, "part", batch=8), progress=False)


def test_sweep_confirms_speed_round_robin_and_ranks_by_it(tmp_path):
    """At the end every deployable point is timed again round-robin; img/s, speed-ups, the front and the
    recommendation come from those timings, and the single pass stays as img_per_s_first. 0 rounds: single pass."""
    res = run_sweep(_cfg(tmp_path, "c", confirm_rounds=2), progress=False, log=lambda *_: None)
    rows = res["rows"]
    assert all(r["img_per_s_first"] > 0 and r["img_per_s"] > 0 for r in rows)
    assert any("4 points timed again round-robin (2 rounds, median)" in n for n in res["notes"])
    base = next(r for r in rows if r["techniques"] == "none")
    assert all(r["speedup"] == pytest.approx(r["img_per_s"] / base["img_per_s"]) for r in rows)
    best = [r for r in rows if r["val_top1"] >= base["val_top1"] - 0.005]
    recommended = [r for r in rows if r["recommended"]]
    assert len(recommended) == 1 and recommended[0]["img_per_s"] == max(r["img_per_s"] for r in best)
    single = run_sweep(_cfg(tmp_path, "s", confirm_rounds=0), progress=False, log=lambda *_: None)
    assert not any("img_per_s_first" in r for r in single["rows"])
    assert any(n.startswith("noise check:") for n in single["notes"])


def test_sweep_budget_stops_and_reports(tmp_path):
    cfg = _cfg(tmp_path, "budget", budget_minutes=1e-6)
    summary = run_sweep(cfg, progress=False, log=lambda *_: None)
    # the budget is spent at once: only the base (always measured, the others are compared to it) is in the report
    assert [r["techniques"] for r in summary["rows"]] == ["none"]
    assert not summary["complete"] and (tmp_path / "budget" / "report.html").exists()
    assert any("budget" in n for n in summary["notes"])


def test_sweep_bad_input(tmp_path):
    with pytest.raises(SweepError, match="not a checkpoint folder"):
        run_sweep(_cfg(tmp_path, candidates=[str(tmp_path / "missing")]), progress=False)
    with pytest.raises(SweepError, match="max-drop-pt"):
        run_sweep(_cfg(tmp_path, max_drop_pt=-1), progress=False)


def test_export_of_an_int8_point_reloads(tmp_path):
    import torch

    import vitlab
    from vitlab.checkpoint import save_checkpoint
    from vitlab.pareto.export import export_point

    torch.manual_seed(0)
    save_checkpoint(vitlab.create_model("vl_test_vit", num_classes=10), tmp_path / "src")
    cfg = SweepConfig(source=str(tmp_path / "src"), out=str(tmp_path), data="synthetic:n=64,classes=10",
                      calib_images=32)
    out = export_point(cfg, {"source": str(tmp_path / "src"), "apply": ["w8a8"]}, tmp_path / "rec")
    runner = vitlab.create_model(str(out))
    assert runner.engine in ("onnxruntime-int8", "openvino-int8")   # engine=auto: whichever was faster here
    assert runner(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_component_names_simulated_bf16_and_int8_rows():
    from vitlab.pareto.claims import component

    def label(*apply, role="technique"):
        return component({"role": role, "apply": list(apply)})

    assert label() == "base"
    assert label("ptq") == label("qhyvit:bits=6") == "simulated"    # fake-quantized: no int8 kernels
    assert label("bf16") == "bf16" and label("w8a8") == "int8"
    assert label("tome:r=2", "w8a8", role="candidate") == "pruned + tokens + int8"
