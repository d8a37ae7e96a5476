"""`vitlab pareto`: measure a model and a sweep of technique stacks, find the accuracy/speed front, recommend one.

The sweep measures points (plan.py) in a fixed order. Each point is one `vitlab.measure` on the validation split:
its score (top-1 for a classifier; PQ, mIoU or AP for a dense model of vitlab.dense: `row["metric"]` names it,
`row["val_score"]` holds it), throughput at `batch` (`img_per_s`, in `row["unit"]`: img/s, or clips/s for a
video model), latency at batch 1, MACs, params and peak memory. Rows are written to
`DIR/results.json` after every point, atomically, so a killed run resumes from the rows it has. Selection is honest:
the front and the recommendation use validation accuracy only; the test split is evaluated afterwards, for the base
model and the recommended point only, and reported beside them.
"""
from ..errors import UserError
import csv
import io
import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import create_model
from ..data import DENSE_KINDS, DataSpec
from ..data.spec import VIDEO_KINDS
from ..explain.robustness import robustness
from ..profiling import environment, num_threads, time_callable
from ..runner import item_shape
from ..techniques import TechniqueError
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.lock import kill_point, lock_folder
from .front import pareto_front, recommend
from .plan import Point, default_stacks, is_simulated, parse_stacks, plan_points, stack_text

__all__ = ["SweepConfig", "run_sweep", "load_results", "TIMING_FIELDS", "SweepError", "score", "metric_label",
           "unit_label"]

RESULTS = "results.json"
# Fields that vary from run to run on the same machine: timings, and what is derived from them (the front, the
# recommendation, and the test accuracy, which is evaluated for the recommendation only). The rest is deterministic.
TIMING_FIELDS = ("img_per_s", "img_per_s_first", "latency_ms", "peak_mem_mb", "measure_s", "speedup", "on_front",
                 "recommended", "test_top1", "test_top5", "test_score", "n_test", "robust_top1", "robust_ece")
# The robustness column: val top-1 and ECE with this share of the model's patches dropped (black), for the front's
# points only (`vitlab.explain.robustness`; the same dropped patches for every point)
ROBUSTNESS_DROP = 0.25
ROBUSTNESS_IMAGES = 500
# Columns of results.csv, in order.
CSV_FIELDS = ("key", "role", "source", "techniques", "engine", "quant_mac_fraction", "simulated", "status",
              "metric", "val_score", "test_score", "val_top1", "test_top1", "drop_pt", "img_per_s", "unit", "speedup", "latency_ms", "macs", "params",
              "peak_mem_mb", "on_front", "recommended", "robust_top1", "robust_ece", "command", "error")


# The selection metric of a row, as the report names it: top-1 for classifiers, the task metric for dense models.
METRIC_LABELS = {"top1": "top-1", "pq": "PQ", "miou": "mIoU", "ap": "AP"}


def score(row: dict, split: str = "val") -> float | None:
    """The row's selection metric on `split` (val or test), a fraction; rows written before dense models had a
    metric of their own hold only top-1."""
    return row.get(f"{split}_score", row.get(f"{split}_top1"))


def metric_label(rows: list[dict]) -> str:
    """What the sweep's accuracy column measures: "top-1", "PQ", "mIoU" or "AP"."""
    metric = next((r.get("metric") for r in rows if r.get("status") == "ok"), None) or "top1"
    return METRIC_LABELS.get(metric, metric)


def unit_label(rows: list[dict]) -> str:
    """What the sweep's throughput (`img_per_s`) counts: "img/s", or "clips/s" for a video model (the rows' `unit`,
    `vitlab.bench.measure.throughput_unit`); rows written before rows had a unit counted images."""
    return next((r.get("unit") for r in rows if r.get("status") == "ok" and r.get("unit")), None) or "img/s"


class SweepError(UserError):
    """A sweep that cannot start or resume; the message says what to change."""


@dataclass
class SweepConfig:
    source: str                                  # model name or checkpoint folder
    out: str                                     # output folder
    data: str = "fashion-mnist"
    data_dir: str | None = None
    max_drop_pt: float = 0.5
    techniques: list[str] | None = None          # --techniques values (None: default_stacks)
    candidates: list[str] = field(default_factory=list)
    budget_minutes: float | None = None
    batch: int = 32
    threads: int | None = None
    calib_images: int = 256
    min_time_s: float = 1.0
    memory: bool = True
    val_limit: int | None = None                 # evaluate only the first N validation images (smoke runs)
    export: bool = True
    restart: bool = False
    confirm_rounds: int = 5                      # re-time every deployable point round-robin at the end (0: off)

    def settings(self) -> dict:
        """What must match for a rerun to reuse rows (the budget and `restart` may change between runs)."""
        keep = ("source", "data", "max_drop_pt", "techniques", "candidates", "batch", "threads", "calib_images",
                "val_limit")
        out = {k: getattr(self, k) for k in keep}
        out["candidates"] = [str(c) for c in self.candidates]
        return out


def load_results(out: str | Path) -> dict:
    path = Path(out) / RESULTS
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SweepError(f"{path} is not valid JSON ({err}); move it away or pass --restart") from err


def _command(cfg: SweepConfig, point: Point, split: str = "val") -> str:
    args = ["vitlab", "measure", point.source, "--data", cfg.data, "--split", split, "--batch", str(cfg.batch)]
    if cfg.threads:
        args += ["--threads", str(cfg.threads)]
    for text in point.apply:
        args += ["--apply", text]
    if any(t.split(":")[0] in ("w8a8", "w8", "ptq") for t in point.apply):
        args += ["--calib-images", str(cfg.calib_images)]
    return shlex.join(args)


def _measure_point(cfg: SweepConfig, point: Point) -> dict:
    from ..bench.measure import measure

    start = time.perf_counter()
    row = {"key": point.key, "role": point.role, "source": point.source, "apply": list(point.apply),
           "techniques": stack_text(point.apply), "simulated": is_simulated(point.apply),
           "command": _command(cfg, point)}
    try:
        torch.manual_seed(0)    # a model given by name gets the same random weights at every point
        (m,) = measure(point.source, apply=list(point.apply), data=cfg.data, split="val", data_dir=cfg.data_dir,
                       eval_limit=cfg.val_limit, batch=cfg.batch, threads=cfg.threads,
                       memory=cfg.memory and not row["simulated"],   # fake-quant memory is no deployment's
                       min_time_s=cfg.min_time_s, calib_split="train", calib_images=cfg.calib_images)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # one failing point is recorded, the sweep goes on
        row.update(status="error", error=f"{type(err).__name__}: {err}", measure_s=time.perf_counter() - start)
        return row
    d = m.to_dict()
    metric = d.get("task_metric") or "top1"
    row.update(metric=metric, val_score=d["top1"] if metric == "top1" else d["task_score"])
    row.update(status="ok", error="", engine=d["engine"], model=d["model"], val_top1=d["top1"], val_top5=d["top5"],
               val_loss=d["loss"], n_val=d["n"], params=d["params"], macs=d["macs"], flops=d["flops"],
               attention_macs=d["attention_macs"], batch=d["batch"], input_size=d["input_size"], dtype=d["dtype"],
               img_per_s=d["img_per_s"], unit=d["unit"], latency_ms=d["latency_ms"], peak_mem_mb=d["peak_mem_mb"],
               threads=d["threads"], cpu_flags=d["cpu_flags"], engine_choice=d["engine_choice"],
               quant_mac_fraction=d["quant_mac_fraction"], measure_s=time.perf_counter() - start)
    return row


def _summarise(rows: list[dict], max_drop_pt: float) -> dict:
    """Mark the front and the recommendation on `rows` (in place), from validation accuracy and throughput."""
    ok = [r for r in rows if r.get("status") == "ok"]
    base = next((r for r in ok if r["role"] == "base" and not r["apply"]), None)
    for r in rows:
        r["on_front"] = False
        r["recommended"] = False
    if base is None:
        return {"base": None, "recommended": None}
    flags = pareto_front([(score(r), r["img_per_s"]) for r in ok])
    for r, f in zip(ok, flags):
        r["on_front"] = f
        r["speedup"] = r["img_per_s"] / base["img_per_s"]
        r["drop_pt"] = 100 * (score(base) - score(r))
    idx = recommend([(score(r), r["img_per_s"]) for r in ok], score(base), max_drop_pt / 100)
    if idx is not None:
        ok[idx]["recommended"] = True
    return {"base": base["key"], "recommended": ok[idx]["key"] if idx is not None else None}


def _write(cfg: SweepConfig, rows: list[dict], extra: dict) -> None:
    out = Path(cfg.out)
    atomic_write_json(out / RESULTS, {"settings": cfg.settings(), **extra, "rows": rows})


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("pareto"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True))
    task = bar.add_task("", total=total, completed=done)
    bar.start()
    return bar, task


def _test_accuracy(cfg: SweepConfig, row: dict) -> dict:
    from ..bench.measure import build_runner, task_accuracy

    with num_threads(cfg.threads):
        torch.manual_seed(0)
        runner = build_runner(row["source"], row["apply"], calib_data=cfg.data, calib_split="train",
                              calib_images=cfg.calib_images, data_dir=cfg.data_dir)
        result = task_accuracy(runner, cfg.data, "test", data_dir=cfg.data_dir)
    out = {"test_score": result["score"], "n_test": result["n"]}
    if result["metric"] == "top1":
        out.update(test_top1=result["top1"], test_top5=result["top5"])
    return out


def _robustness(cfg: SweepConfig, row: dict) -> dict:
    """Val top-1 and ECE of the point with ROBUSTNESS_DROP of its patches dropped, on ROBUSTNESS_IMAGES images."""
    from ..bench.measure import build_runner, dataset_for

    with num_threads(cfg.threads):
        torch.manual_seed(0)
        runner = build_runner(row["source"], row["apply"], calib_data=cfg.data, calib_split="train",
                              calib_images=cfg.calib_images, data_dir=cfg.data_dir)
        val = dataset_for(runner, cfg.data, "val", data_dir=cfg.data_dir)
        dropped = robustness(runner, val, val, severities={"drop_zero": (ROBUSTNESS_DROP,)},
                             limit=ROBUSTNESS_IMAGES, val_limit=ROBUSTNESS_IMAGES)[-1]
    return {"robust_top1": dropped.accuracy, "robust_ece": dropped.ece}


def _retime(cfg: SweepConfig, row: dict) -> float:
    """The base's throughput measured again now, over the one in its row (how much the machine drifted)."""
    from ..bench.measure import build_runner

    with num_threads(cfg.threads):
        torch.manual_seed(0)
        runner = build_runner(row["source"], row["apply"])
        images = torch.randn(cfg.batch, *item_shape(runner))   # (C, H, W), or (C, T, H, W) for a video model
        timing = time_callable(lambda: runner(images), min_time_s=cfg.min_time_s)
    return cfg.batch / timing.median_s / row["img_per_s"]


def _confirm_speed(cfg: SweepConfig, rows: list[dict]) -> str | None:
    """Time every deployable point again, round-robin: `confirm_rounds` rounds, each timing every point once, and
    keep the median of the rounds as its throughput (the first, single pass moves as `img_per_s_first`). A machine that
    drifts during the sweep then slows all points alike instead of whichever ran at the time. Returns a note."""
    from ..bench.measure import build_runner

    todo = [r for r in rows if r.get("status") == "ok" and not r["simulated"] and "img_per_s_first" not in r]
    if not todo:
        return None
    with num_threads(cfg.threads):
        runners = []
        for r in todo:
            torch.manual_seed(0)
            runners.append(build_runner(r["source"], r["apply"], calib_data=cfg.data, calib_split="train",
                                        calib_images=cfg.calib_images, data_dir=cfg.data_dir))
        images = torch.randn(cfg.batch, *item_shape(runners[0]), generator=torch.Generator().manual_seed(0))
        times: list[list[float]] = [[] for _ in todo]
        with torch.inference_mode():
            for _ in range(cfg.confirm_rounds):
                for i, runner in enumerate(runners):
                    times[i].append(time_callable(lambda: runner(images), warmup=1 if times[i] else 2, min_runs=2,
                                                  min_time_s=cfg.min_time_s / cfg.confirm_rounds).median_s)
        for runner in runners:
            getattr(runner, "close", lambda: None)()
    moved = []
    for r, t in zip(todo, times):
        r["img_per_s_first"] = r["img_per_s"]
        r["img_per_s"] = cfg.batch / sorted(t)[len(t) // 2]
        moved.append(r["img_per_s_first"] / r["img_per_s"])
    return (f"speed: {len(todo)} points timed again round-robin ({cfg.confirm_rounds} rounds, median); their first "
            f"single passes read {min(moved):.2f}-{max(moved):.2f}x of that, which is this machine's noise for a "
            "single pass")


def run_sweep(cfg: SweepConfig, *, progress: bool = True, log=print, _stop_after: int | None = None) -> dict:
    """Run (or resume) the sweep described by `cfg`; write results.json/.csv, plots, report.html; return a summary.

    `cfg.out` is locked for the whole sweep (vitlab/utils/lock.py): a second sweep on the same folder stops with
    `FolderLocked`, naming the pid and host that hold it, instead of interleaving its rows with the first's.

    `_stop_after` (tests): stop after measuring that many new points, as a kill would.
    """
    with lock_folder(cfg.out, "vitlab pareto"):
        return _run_sweep(cfg, progress=progress, log=log, _stop_after=_stop_after)


def _run_sweep(cfg: SweepConfig, *, progress: bool, log, _stop_after: int | None) -> dict:
    if cfg.max_drop_pt < 0:
        raise SweepError(f"--max-drop-pt must be >= 0, got {cfg.max_drop_pt}")
    if cfg.budget_minutes is not None and cfg.budget_minutes <= 0:
        raise SweepError(f"--budget-minutes must be > 0, got {cfg.budget_minutes}")
    for cand in cfg.candidates:
        if not Path(cand).is_dir():
            raise SweepError(f"--candidates {cand}: not a checkpoint folder")
    _check_task_data(cfg)
    out = Path(cfg.out)
    notes: list[str] = []
    if cfg.techniques:
        base_stacks = candidate_stacks = parse_stacks(cfg.techniques)
    else:
        base_stacks, candidate_stacks, notes = default_stacks(create_model(cfg.source))
    points = plan_points(cfg.source, cfg.candidates, base_stacks, candidate_stacks)

    previous = {} if cfg.restart else load_results(out)
    if previous and previous.get("settings") != cfg.settings():
        old = previous.get("settings", {})
        diff = sorted(k for k in set(old) | set(cfg.settings()) if old.get(k) != cfg.settings().get(k))
        raise SweepError(f"{out / RESULTS} holds a sweep with different settings ({', '.join(diff)}): "
                         "use another --out, or --restart to discard it")
    done = {r["key"]: r for r in previous.get("rows", []) if r.get("status") in ("ok", "error")}
    keys = [p.key for p in points]
    rows = [done[k] for k in keys if k in done]
    if rows:
        failed = [r["key"] for r in rows if r.get("status") == "error"]
        again = (f"; {len(failed)} of them failed ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}) "
                 "and are kept as failed: pass --restart to measure everything again" if failed else "")
        log(f"resuming: {len(rows)} of {len(points)} points already measured in {out / RESULTS}{again}")
        if failed:
            notes.append(f"resumed with {len(failed)} failed point(s) from an earlier run, not retried: pass "
                         "--restart to measure them again")

    start = time.monotonic()
    budget_s = cfg.budget_minutes * 60 if cfg.budget_minutes else None
    stopped = None
    bar = _progress(progress, len(points), len(rows))
    new = 0
    try:
        for point in points:
            if point.key in done:
                continue
            elapsed = time.monotonic() - start
            per_point = elapsed / new if new else 0.0
            is_base = point.role == "base" and not point.apply     # always measured: the others need it
            if budget_s is not None and not is_base and elapsed + per_point > budget_s:
                stopped = (f"--budget-minutes {cfg.budget_minutes:g} reached after {elapsed / 60:.1f} min: "
                           f"{len(rows)} of {len(points)} points measured")
                break
            if _stop_after is not None and new >= _stop_after:
                stopped = "stopped by _stop_after"
                break
            if bar:
                bar[0].update(bar[1], description=point.key)
            row = _measure_point(cfg, point)
            rows.append(row)
            done[point.key] = row
            new += 1
            rows.sort(key=lambda r: keys.index(r["key"]))
            summary = _summarise(rows, cfg.max_drop_pt)
            _write(cfg, rows, {"complete": False, "notes": notes, **summary})
            kill_point(f"pareto-row-{len(rows)}")   # test hook (tests/engine/test_crash_resume.py)
            if bar:
                bar[0].advance(bar[1])
            else:
                status = (f"val {metric_label([row])} {100 * score(row):.2f} %, "
                          f"{row['img_per_s']:.0f} {unit_label([row])}" if row["status"] == "ok" else row["error"])
                log(f"[{len(rows)}/{len(points)}] {point.key}: {status}")
    finally:
        if bar:
            bar[0].stop()
    if stopped:
        notes.append(stopped)
        log(stopped)
    if _stop_after is not None and stopped == "stopped by _stop_after":
        return {"rows": rows, "complete": False}

    summary = _summarise(rows, cfg.max_drop_pt)
    if summary["base"] is None:
        errors = [r for r in rows if r["role"] == "base" and not r["apply"]]
        why = errors[0]["error"] if errors else "not measured"
        raise SweepError(f"the base model could not be measured ({why})")
    by_key = {r["key"]: r for r in rows}
    if cfg.confirm_rounds > 0:
        confirmed = _confirm_speed(cfg, rows)
        if confirmed:
            log(confirmed)
            notes.append(confirmed)
            summary = _summarise(rows, cfg.max_drop_pt)   # front and recommendation from the round-robin timings
    for key in dict.fromkeys(k for k in (summary["base"], summary["recommended"]) if k):
        by_key[key].update(_test_accuracy(cfg, by_key[key]))
    dense, clips = metric_label(rows) != "top-1", _is_video_data(cfg.data)
    if dense:
        notes.append(f"robustness column: patch-drop robustness measures classifiers; not measured for this "
                     f"{metric_label(rows)} model")
    elif clips:
        notes.append("robustness column: patch-drop robustness measures images; not measured on clips")
    for row in rows:
        for field in ("robust_top1", "robust_ece"):   # a resumed run's front may have moved
            row.pop(field, None)
        if row.get("on_front") and not dense and not clips:
            try:
                row.update(_robustness(cfg, row))
            except Exception as err:  # the report still gets written; the note says which point has no column
                notes.append(f"robustness of {row['key']} failed: {type(err).__name__}: {err}")
    if new and cfg.confirm_rounds <= 0:
        drift = _retime(cfg, by_key[summary["base"]])
        notes.append(f"noise check: the base model timed again after the sweep ran at {drift:.2f}x its first "
                     "throughput; speed-ups nearer 1 than that are within this machine's noise")
    complete = len(rows) == len(points)
    result = {"complete": complete, "notes": notes, **summary,
              "max_drop_pt": cfg.max_drop_pt, "environment": _environment(cfg)}
    if cfg.export and summary["recommended"]:
        from .export import export_point

        try:
            result["exported"] = str(export_point(cfg, by_key[summary["recommended"]], out / "recommended"))
        except Exception as err:  # the report still gets written; the note says why there is no export
            notes.append(f"export of the recommended point failed: {type(err).__name__}: {err}")
    if result.get("exported") and dense:
        notes.append("explanation of the recommended point: the report's maps explain a classifier's top-1 class; "
                     "`vitlab predict` draws the dense model's masks and boxes instead")
    elif result.get("exported") and clips:
        notes.append("explanation of the recommended point: the report's maps explain images; not drawn for clips")
    elif result.get("exported"):
        from .export import explain_point

        try:
            picture, method = explain_point(result["exported"], cfg.data, out / "recommended-explanation.png",
                                            data_dir=cfg.data_dir)
            result["explanation"] = {"file": picture.name, "method": method,
                                     "command": f"vitlab explain {result['exported']} --image IMAGE --method {method}"
                                                " --out explanation.png"}
        except Exception as err:  # the report still gets written; the note says why there is no picture
            notes.append(f"explanation of the recommended point failed: {type(err).__name__}: {err}")
    _write(cfg, rows, result)
    _write_csv(out / "results.csv", rows)
    from .report import write_report

    result["report"] = str(write_report(cfg, rows, result))
    _write(cfg, rows, result)
    return {**result, "rows": rows}


def _is_video_data(data: str) -> bool:
    """Whether `data` holds clips (C, T, H, W) rather than images."""
    spec = DataSpec.parse(data)
    return spec.kind in (*VIDEO_KINDS, "videofolder") or (spec.kind == "synthetic" and spec.option("frames") > 0)


def _check_task_data(cfg: SweepConfig) -> None:
    """A dense checkpoint is measured on scenes (its task metric), a classifier on images: refuse a mismatch before
    any point is measured."""
    from ..dense.engine import is_dense_checkpoint

    dense_data = DataSpec.parse(cfg.data).kind in DENSE_KINDS
    for source in (cfg.source, *cfg.candidates):
        dense = Path(source).is_dir() and is_dense_checkpoint(source)
        if dense and not dense_data:
            raise SweepError(f"{source} is a dense checkpoint: give --data with scenes (fmnist-scenes[:...] or "
                             f"coco:PATH), not {cfg.data!r}")
        if dense_data and not dense:
            raise SweepError(f"--data {cfg.data} holds scenes for dense models, but {source} is a classifier: give "
                             "an image dataset (fashion-mnist, imagefolder:PATH, ...)")


def _environment(cfg: SweepConfig) -> dict:
    with num_threads(cfg.threads):
        env = environment()
    return {k: v for k, v in env.items() if isinstance(v, (str, int, float, bool, type(None)))}
