"""The Pareto lab on a video model: ToMe over tubelets and int8 measured on clips (B, C, T, H, W), every point timed
on clips, and the image-only columns (patch-drop robustness, the explanation picture) left out with a note."""
import csv

from vitlab.pareto import SweepConfig, run_sweep


def test_sweep_on_clips_with_tome_over_tubelets_and_int8(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_ENGINE_TRIAL", "off")
    cfg = SweepConfig(source="vl_test_vivit_joint", out=str(tmp_path / "p"), data="synthetic:n=16,classes=6,frames=10",
                      techniques=["tome:r=8; tome:r=8+w8a8"], min_time_s=0.02, memory=False, threads=1,
                      confirm_rounds=1, batch=4)
    result = run_sweep(cfg, progress=False, log=lambda *_: None)
    rows = {r["techniques"]: r for r in result["rows"]}
    assert set(rows) == {"none", "tome", "tome + w8a8"}      # r=8 is ToMe's default: its text is "tome"
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    assert rows["tome"]["macs"] < rows["none"]["macs"]          # tubelet tokens merged: fewer MACs per clip
    assert rows["tome + w8a8"]["engine"] != rows["none"]["engine"]   # a deployed int8 engine, not torch
    assert all(r["img_per_s_first"] > 0 for r in rows.values())      # re-timed round-robin on clips
    assert any("not measured on clips" in n for n in result["notes"])
    assert {r["unit"] for r in rows.values()} == {"clips/s"}            # throughput counts clips, everywhere
    with open(tmp_path / "p" / "results.csv") as f:
        assert {r["unit"] for r in csv.DictReader(f)} == {"clips/s"}
    page = open(result["report"]).read()
    assert "clips/s" in page and "img/s" not in page
    assert not any("robustness of" in n or "explanation of the recommended point failed" in n
                   for n in result["notes"]), result["notes"]
