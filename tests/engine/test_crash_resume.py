"""Nothing lost: kill -9 and resume (train with 0 and 2 workers, prune, pareto), one writer per output
folder, an existing run is never overwritten by accident, resumed runs never ignore a flag, crash-safe metrics,
unwritable --out refused before any work.

Kills are real SIGKILLs of a `python -m vitlab` subprocess, at a point named by VITLAB_TEST_KILL_AT
(vitlab.utils.lock.kill_point); what resumes afterwards runs in this process.
"""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitlab
from vitlab.cli import main
from vitlab.engine import TrainConfig, fit
from vitlab.engine.train import RunExists, TrainInterrupted
from vitlab.utils.lock import LOCK_NAME, lock_folder

SYNTH = "synthetic:n=64,classes=4"


def _vitlab(*args, kill_at: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VITLAB_TEST_KILL_AT", None)
    if kill_at:
        env["VITLAB_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "vitlab", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _main(*args) -> int:
    return main([str(a) for a in args])


def _weights(run) -> dict:
    return load_file(str(Path(run) / "model.safetensors"))


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _tree(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with its content hash: to show a folder was not touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """A 2-class RGB image folder: imagefolder's train augmentation (crop, flip) draws random numbers per image."""
    root = tmp_path_factory.mktemp("imgs")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 4)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                low = 150 if label == "cat" else 0
                pixels = (low + torch.rand(20, 20, 3, generator=gen) * 100).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return f"imagefolder:{root}"


# 6 steps per epoch, 2 epochs; drop path (torch RNG), mixup (numpy RNG) and augmentation all draw random numbers
TRAIN = dict(model="vl_test_vit", epochs=2, batch_size=4, lr=3e-3, warmup_epochs=0.5, drop_path=0.1, mixup=0.4,
             save_every=2, threads=1, model_kwargs={"in_chans": 3}, progress=False)


def _train_args(data: str, out, workers: int) -> list:
    return ["train", "--model", "vl_test_vit", "--data", data, "--epochs", 2, "--batch-size", 4, "--lr", 3e-3,
            "--warmup-epochs", 0.5, "--drop-path", 0.1, "--mixup", 0.4, "--save-every", 2, "--threads", 1,
            "--model-kwargs", '{"in_chans": 3}', "--workers", workers, "--no-progress", "--out", out]


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> Path:
    """The uninterrupted run (in this process, --workers 0)."""
    return fit(TrainConfig(out=str(tmp_path_factory.mktemp("straight") / "run"), data=images, **TRAIN))


@pytest.mark.parametrize("workers, kill_step, saved", [
    (0, 9, (8, 1, 2)),    # in epoch 2, state from --save-every at step 8
    (2, 9, (8, 1, 2)),    # the same with two DataLoader workers
    (0, 7, (6, 1, 0)),    # state from epoch 1's end (after which the evaluation ran)
])
def test_train_killed_mid_epoch_resumes_bitwise(images, straight, tmp_path, workers, kill_step, saved):
    run = tmp_path / "run"
    killed = _vitlab(*_train_args(images, run, workers), kill_at=f"train-step-{kill_step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == saved
    assert state["config"]["workers"] == workers
    # resumed as a user does, in a new process (in the test process, DataLoader workers forked from a process that
    # had loaded OpenVINO / ONNX Runtime ended the whole suite with a SIGSEGV)
    resumed = _vitlab("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"taking over the lock left by pid \d+ on .*\(vitlab train", resumed.stderr)
    _assert_same_weights(straight, run)
    assert [m["step"] for m in _metrics(run)] == [6, 12]
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_train_killed_at_a_random_moment_resumes_bitwise(images, tmp_path, workers):
    """SIGKILL from outside, at whatever the run is doing a random time after its first --save-every save (a
    step, a save, an epoch's end), then --resume: the same weights and metrics as the uninterrupted run."""
    import random
    import time

    cfg = dict(TRAIN, epochs=8, save_every=3)
    start = time.perf_counter()
    straight = fit(TrainConfig(out=str(tmp_path / "straight"), data=images, **cfg))
    duration = time.perf_counter() - start
    run = tmp_path / "run"
    args = _train_args(images, run, workers)
    args[args.index("--epochs") + 1], args[args.index("--save-every") + 1] = 8, 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VITLAB_TEST_KILL_AT", None)
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not (run / "train_state.pt").exists():
        assert proc.poll() is None, "the run ended before its first save"
        time.sleep(0.01)
    delay = random.uniform(0, 0.6 * duration)   # the run itself takes about `duration` from its start
    time.sleep(delay)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, f"the run ended within {delay:.2f} s of its first save: make it longer"
    with pytest.warns(UserWarning):
        resumed = fit(resume=str(run))
    _assert_same_weights(straight, resumed)
    timing = ("img_per_s", "elapsed_s")
    assert [{k: v for k, v in m.items() if k not in timing} for m in _metrics(resumed)] == \
        [{k: v for k, v in m.items() if k not in timing} for m in _metrics(straight)], f"killed after {delay:.2f} s"


def test_workers_do_not_change_the_result(images, straight, tmp_path):
    # every image's augmentation is seeded from (seed, epoch, step, position), not from whichever worker loads it
    # (in a new process: DataLoader workers are not forked from the test process, see above)
    done = _vitlab(*_train_args(images, tmp_path / "w2", 2))
    assert done.returncode == 0, done.stderr
    _assert_same_weights(straight, tmp_path / "w2")


def test_train_killed_after_its_epoch_line_does_not_repeat_it(images, straight, tmp_path):
    # killed after metrics.jsonl got epoch 1's line but before the epoch's state was saved (the last one is from
    # --save-every at step 6): the line is dropped on resume, the epoch's end is run again, and every line but the
    # timings equals the uninterrupted run's (the state carries the epoch's loss sum)
    run = tmp_path / "run"
    killed = _vitlab(*_train_args(images, run, 0), kill_at="train-epoch-1-metrics")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [m["step"] for m in _metrics(run)] == [6]
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert (state["global_step"], state["step_in_epoch"], state["metrics_lines"]) == (6, 6, 0)
    with pytest.warns(UserWarning, match="1 line.* written after the last saved state"):
        resumed = fit(resume=str(run))
    _assert_same_weights(straight, resumed)
    timing = ("img_per_s", "elapsed_s")
    assert [{k: v for k, v in m.items() if k not in timing} for m in _metrics(resumed)] == \
        [{k: v for k, v in m.items() if k not in timing} for m in _metrics(straight)]


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), model="vl_test_vit", data=SYNTH, epochs=3, batch_size=16,
                      warmup_epochs=0.5, threads=1, progress=False, eval_val=False, save_every=1)
    with pytest.raises(TrainInterrupted):
        fit(cfg, _crash_at_step=6)   # 4 steps per epoch: epoch 1's line is written, state saved at step 6
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"epoch": 2, "step": 8, "train_lo')   # a kill in the middle of writing the next line
    with pytest.warns(UserWarning, match="torn line"):
        fit(resume=str(tmp_path / "run"))
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [4, 8, 12]


def test_metrics_lines_are_each_one_fsynced_write(tmp_path, monkeypatch):
    from vitlab.engine import train

    calls = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(train.os, "write", lambda fd, data: calls.append(("write", data)) or real_write(fd, data))
    monkeypatch.setattr(train.os, "fsync", lambda fd: calls.append(("fsync",)) or real_fsync(fd))
    train._append_line(tmp_path / "m.jsonl", {"step": 1})
    assert calls == [("write", b'{"step": 1}\n'), ("fsync",)]


# --- an existing run is refused; --overwrite replaces it only once the new run has finished -------------------------

@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "old"
    assert _main("train", "--model", "vl_test_vit", "--data", SYNTH, "--epochs", 1, "--batch-size", 16, "--no-val",
                 "--no-progress", "--threads", 1, "--out", run) == 0
    return run


def test_train_refuses_an_existing_run_and_touches_nothing(old_run, capsys):
    before = _tree(old_run)
    capsys.readouterr()
    assert _main("train", "--model", "vl_test_vit", "--data", SYNTH, "--epochs", 2, "--out", str(old_run)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"vitlab train: error: {old_run} already holds a run; continue it with --resume {old_run} or "
                   "choose another --out / pass --overwrite")
    assert _tree(old_run) == before
    # a folder with only a checkpoint in it is refused too (e.g. --out equal to a checkpoint folder)
    (old_run / "train_state.pt").unlink()
    (old_run / "metrics.jsonl").unlink()
    with pytest.raises(RunExists, match="already holds a checkpoint"):
        fit(TrainConfig(out=str(old_run), model="vl_test_vit", data=SYNTH, progress=False))
    with pytest.raises(RunExists, match="is the --init checkpoint"):
        fit(TrainConfig(out=str(old_run), init=str(old_run), data=SYNTH, progress=False), overwrite=True)


def test_overwrite_replaces_the_run_without_mixing(old_run, capsys):
    assert _main("train", "--model", "vl_test_vit", "--data", SYNTH, "--epochs", 2, "--batch-size", 32, "--no-val",
                 "--no-progress", "--threads", 1, "--out", old_run, "--overwrite") == 0
    assert [m["step"] for m in _metrics(old_run)] == [2, 4]   # the new run's lines only
    assert vitlab.load_config(old_run)["training"]["batch_size"] == 32
    assert sorted(p.name for p in old_run.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors",
                                                          "train_state.pt"]


def test_overwrite_that_fails_puts_the_old_run_back(old_run):
    before = _tree(old_run)
    cfg = TrainConfig(out=str(old_run), model="vl_test_vit", data=SYNTH, epochs=3, batch_size=16, threads=1,
                      progress=False, eval_val=False)
    with pytest.raises(TrainInterrupted):
        fit(cfg, overwrite=True, _crash_at_step=5)   # after the new run wrote its first epoch
    assert _tree(old_run) == before


# --- one writer per output folder ----------------------------------------------------------------------------------

def test_a_second_process_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "sweep"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom vitlab.utils.lock import lock_folder\n"
                               f"lock_folder({str(out)!r}, 'vitlab pareto')\nprint('locked', flush=True)\n"
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert _main("pareto", "vl_test_vit", "--data", "synthetic:n=64,classes=10", "--techniques", "tome:r=1",
                     "--out", out, "--no-memory", "--min-time", "0.02") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert f"in use by vitlab pareto (pid {holder.pid} on {socket.gethostname()}" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]   # no rows written beside the holder's
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file is taken over, with a warning naming its pid
    with pytest.warns(UserWarning, match=f"taking over the lock left by pid {holder.pid}"):
        lock_folder(out, "test").release()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("verb", ["train", "resume", "prune", "pareto"])
def test_every_writer_takes_the_lock(tmp_path, old_run, capsys, verb):
    out = old_run if verb == "resume" else tmp_path / "out"
    args = {"train": ["train", "--model", "vl_test_vit", "--data", SYNTH, "--out", str(out)],
            "resume": ["train", "--resume", str(out)],
            "prune": ["prune", str(old_run), "--importance", "l1", "--out", str(out)],
            "pareto": ["pareto", "vl_test_vit", "--data", SYNTH, "--out", str(out)]}[verb]
    with lock_folder(out, "vitlab test"):
        capsys.readouterr()
        assert _main(*args) == 2
        assert f"is in use by vitlab test (pid {os.getpid()}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


# --- prune killed mid-run ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kill_at", ["prune-staged", "commit-half"])
def test_prune_killed_leaves_no_half_written_checkpoint(old_run, tmp_path, kill_at):
    """Killed with the new checkpoint written to its staging folder (not committed), or half-way through moving
    it in (new weights beside the old config.json): the next lock of the folder discards the first and finishes
    the second, so the folder holds one whole checkpoint, and a rerun succeeds."""
    out = tmp_path / "pruned"
    assert _main("prune", old_run, "--importance", "l1", "--target-flops", "0.8", "--out", out) == 0
    old = _tree(out)
    args = ["prune", old_run, "--importance", "l1", "--target-flops", "0.5", "--out", out]
    assert _main(*args[:-1], tmp_path / "straight") == 0
    killed = _vitlab(*args, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lock_folder(out, "test").release()   # what any verb's lock does first
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    if kill_at == "prune-staged":
        assert _tree(out) == old   # the old checkpoint, whole
    else:
        _assert_same_weights(out, tmp_path / "straight")   # the new one, whole
    assert vitlab.create_model(out) is not None
    assert _main(*args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_weights(out, tmp_path / "straight")
    assert vitlab.load_config(out)["training"]["pruned"] == vitlab.load_config(tmp_path / "straight")["training"][
        "pruned"]


# --- pareto killed mid-sweep ---------------------------------------------------------------------------------------

def test_pareto_killed_resumes_without_duplicate_rows(tmp_path):
    from vitlab.pareto import SweepConfig, load_results, run_sweep

    stacks = "tome:r=1; tome:r=2; evit:keep_rate=0.5"
    out = tmp_path / "sweep"
    killed = _vitlab("pareto", "vl_test_vit", "--data", "synthetic:n=64,classes=10", "--techniques", stacks,
                     "--min-time", "0.02", "--no-memory", "--threads", "1", "--confirm-rounds", "0", "--no-export",
                     "--no-progress", "--out", out, kill_at="pareto-row-2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [r["techniques"] for r in load_results(out)["rows"]] == ["none", "tome:r=1"]
    cfg = SweepConfig(source="vl_test_vit", out=str(out), data="synthetic:n=64,classes=10", techniques=[stacks],
                      min_time_s=0.02, memory=False, threads=1, confirm_rounds=0, export=False)
    messages = []
    resumed = run_sweep(cfg, progress=False, log=messages.append)
    assert any("resuming: 2 of 4" in m for m in messages)
    keys = [r["key"] for r in load_results(out)["rows"]]
    assert len(keys) == len(set(keys)) == 4 and resumed["complete"]
    assert not (out / LOCK_NAME).exists()


# --- flags with --resume, single-class data, warm-up longer than the run ------------------------------------------

def test_resume_refuses_changed_flags_by_name_and_extends_epochs(old_run, capsys):
    before = _tree(old_run)
    capsys.readouterr()
    assert _main("train", "--resume", str(old_run), "--lr", "0.01", "--seed", "3", "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run has 0.001)" in err and "--seed 3 (the run has 0)" in err
    assert len(err.strip().splitlines()) == 1 and "--epochs 2 (" not in err   # epochs may change
    assert _tree(old_run) == before
    # the default value given explicitly is a flag given too
    assert _main("train", "--resume", str(old_run), "--batch-size", "128") == 2
    assert "--batch-size 128 (the run has 16)" in capsys.readouterr().err
    # --epochs extends the schedule, and says so; settings that do not change the result may change
    assert _main("train", "--resume", str(old_run), "--epochs", "2", "--threads", "1", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "--epochs 2: extending the run from 1 to 2 epochs" in err
    assert [m["step"] for m in _metrics(old_run)] == [4, 8]
    assert vitlab.load_config(old_run)["training"]["epochs"] == 2


def test_single_class_data_is_refused_and_short_runs_warn(tmp_path, capsys):
    one = tmp_path / "one"
    assert _main("train", "--model", "vl_test_vit", "--data", "synthetic:n=64,classes=1", "--out", one) == 2
    err = capsys.readouterr().err
    assert "--data synthetic:n=64,classes=1 has 1 class" in err and len(err.strip().splitlines()) == 1
    assert not one.exists()
    with pytest.warns(UserWarning, match="never decays"):
        fit(TrainConfig(out=str(tmp_path / "short"), model="vl_test_vit", data=SYNTH, epochs=0.5, warmup_epochs=1,
                        batch_size=16, threads=1, progress=False, eval_val=False))


# --- unwritable --out, checked before any work ---------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["train", "prune", "pareto", "quantize", "export", "eval"])
def test_unwritable_out_is_refused_before_any_work(tmp_path, old_run, capsys, verb):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    bad = blocker / "out"
    args = {"train": ["train", "--model", "vl_test_vit", "--data", SYNTH],
            "prune": ["prune", str(old_run), "--importance", "l1"],
            "pareto": ["pareto", str(old_run), "--data", SYNTH],
            "quantize": ["quantize", str(old_run), "--apply", "w8", "--data", SYNTH],
            "export": ["export", str(old_run), "--format", "onnx"],
            "eval": ["eval", str(old_run), "--data", SYNTH]}[verb]
    capsys.readouterr()
    assert _main(*args + ["--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--out {bad}: cannot write there" in err and len(err.strip().splitlines()) == 1
    if os.geteuid() != 0:   # root writes anywhere: only the file in the way stops it
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert _main(*args + ["--out", str(ro / "sub")]) == 2
        assert "cannot write there: Permission denied" in capsys.readouterr().err
