"""DeiT-LT (vitlab/engine/deit_lt.py) and the long-tailed Fashion-MNIST split (`fashion-mnist:imbalance=R`)."""
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vitlab.data import DataError, DataSpec, build_dataset
from vitlab.data.fashion_mnist import long_tail_counts
from vitlab.engine import TrainConfig, fit
from vitlab.engine.deit_lt import DRW, DeiTLT, deitlt_loss, drw_weights, strong_augment, two_head_model
from vitlab.engine.recipes import RecipeError, Step, format_recipe, parse_recipe


def test_long_tail_counts_are_cifar10_lt():
    # CIFAR-10-LT at imbalance 100 (LDAM-DRW, Cao et al. 2019; 12,406 training images)
    counts = long_tail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and sum(counts) == 12406
    assert long_tail_counts(5000, 10, 1) == [5000] * 10


def test_fashion_mnist_long_tail_split():
    balanced = build_dataset("fashion-mnist", "train")
    lt = build_dataset("fashion-mnist:imbalance=100", "train")
    n_max = int(torch.bincount(balanced.targets).min())
    expected = [int(n_max * (1 / 100) ** (i / 9)) for i in range(10)]
    assert torch.bincount(lt.targets, minlength=10).tolist() == expected and expected[-1] == n_max // 100
    assert set(lt.indices.tolist()) <= set(balanced.indices.tolist()) and str(lt.spec) == "fashion-mnist:imbalance=100"
    assert torch.equal(lt.indices, build_dataset("fashion-mnist:imbalance=100", "train").indices)   # seeded
    assert not torch.equal(lt.indices, build_dataset("fashion-mnist:imbalance=100", "train", seed=1).indices)
    for split in ("val", "test"):   # evaluation stays balanced
        assert torch.equal(build_dataset("fashion-mnist:imbalance=100", split).indices,
                           build_dataset("fashion-mnist", split).indices)


def test_spec_options():
    assert DataSpec.parse(str(DataSpec.parse("fashion-mnist:imbalance=50"))).option("imbalance") == 50
    assert DataSpec.parse("fashion-mnist").option("imbalance") == 1
    with pytest.raises(DataError, match="unknown option 'imb': fashion-mnist knows imbalance"):
        DataSpec.parse("fashion-mnist:imb=3")
    with pytest.raises(DataError, match="imbalance='0' must be a positive integer"):
        DataSpec.parse("fashion-mnist:imbalance=0")
    with pytest.raises(DataError, match="takes no path"):
        DataSpec.parse("fashion-mnist:/data")


def test_drw_weights_are_the_effective_number_formula():
    counts, beta = [100, 10, 1], 0.9
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]           # 1 / effective number (Cui et al. eq. 4)
    expected = [r / sum(raw) * 3 for r in raw]
    torch.testing.assert_close(drw_weights(counts, beta), torch.tensor(expected))
    # beta -> 1: inverse class frequency; beta -> 0: no re-weighting
    w = drw_weights([1000, 100, 10], 1 - 1e-9)
    torch.testing.assert_close(w / w[0], torch.tensor([1.0, 10.0, 100.0]), rtol=1e-3, atol=0)
    torch.testing.assert_close(drw_weights([1000, 100, 10], 1e-6), torch.ones(3))


def _ce(logits: list[float], k: int) -> float:
    return -logits[k] + math.log(sum(math.exp(v) for v in logits))


def test_loss_by_hand():
    cls = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    dist = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    teacher = torch.tensor([[0.0, 3.0, 1.0], [0.0, 0.0, 5.0]])          # argmax 1, 2
    y = torch.tensor([0, 2])
    ce_cls = (_ce([2, 0, -1], 0) + _ce([0.5, 1.5, 0], 2)) / 2
    ce_dist = [_ce([0, 1, 0], 1), _ce([1, 0, 2], 2)]
    got = deitlt_loss(cls, dist, teacher, y, alpha=0.5)
    assert got.item() == pytest.approx(0.5 * ce_cls + 0.5 * sum(ce_dist) / 2, rel=1e-6)
    # DRW: the distillation CE is weighted by the teacher's class, normalized by the weights' sum
    w = torch.tensor([0.5, 1.0, 1.5])
    got = deitlt_loss(cls, dist, teacher, y, alpha=0.25, weights=w)
    assert got.item() == pytest.approx(0.75 * ce_cls + 0.25 * (1.0 * ce_dist[0] + 1.5 * ce_dist[1]) / 2.5, rel=1e-6)
    # soft (mixed) targets on the class token
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    ce_soft = (0.7 * _ce([2, 0, -1], 0) + 0.3 * _ce([2, 0, -1], 1) + _ce([0.5, 1.5, 0], 2)) / 2
    assert deitlt_loss(cls, dist, teacher, soft, alpha=0.0).item() == pytest.approx(ce_soft, rel=1e-6)


def test_weighted_loss_split_over_processes_matches_one_batch():
    torch.manual_seed(0)
    cls, dist, teacher = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)
    y, w = torch.randint(0, 4, (8,)), torch.tensor([0.2, 0.5, 1.3, 2.0])
    grad_one = torch.autograd.grad(deitlt_loss(cls, dist, teacher, y, 0.5, w), (cls, dist))
    total = w[teacher.argmax(-1)].sum() / 2           # what each of 2 processes gets from the all-reduce
    halves = [deitlt_loss(cls[s], dist[s], teacher[s], y[s], 0.5, w, total) for s in (slice(0, 4), slice(4, 8))]
    grad_two = torch.autograd.grad(sum(halves) / 2, (cls, dist))  # DDP averages the processes' gradients
    for a, b in zip(grad_one, grad_two):
        torch.testing.assert_close(a, b)


def test_drw_recipe_switches_to_weighted_ce_at_its_epoch():

    recipe = parse_recipe("drw:drw=1,beta=0.5")
    assert isinstance(recipe, DRW)
    cfg = SimpleNamespace(epochs=2, batch_size=4, mixup=0.0, cutmix=0.0)
    rt = SimpleNamespace(device="cpu", distributed=False)

    class Data(list):   # 8 images: 6 of class 0, 2 of class 1
        targets, num_classes = torch.tensor([0] * 6 + [1] * 2), 2

    recipe.setup(torch.nn.Identity(), Data(range(8)), cfg, rt)    # 2 steps per epoch: DRW from global step 2
    w = [(1 - 0.5) / (1 - 0.5 ** 6), (1 - 0.5) / (1 - 0.5 ** 2)]
    w = [v / sum(w) * 2 for v in w]
    logits, y = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]]), torch.tensor([0, 1, 1])
    sentinel = torch.tensor(123.0)

    def step(global_step: int) -> Step:
        return Step(model=torch.nn.Identity(), train_model=torch.nn.Identity(), images=logits, targets=y, soft=None,
                    indices=[0, 1, 2], epoch=global_step // 2, step=global_step % 2, global_step=global_step,
                    default_loss=lambda: sentinel)

    assert recipe.loss(step(1)) is sentinel
    expected = (w[0] * _ce([1, 0], 0) + w[1] * _ce([0, 2], 1) + w[1] * _ce([0.5, 0.5], 1)) / (w[0] + 2 * w[1])
    assert recipe.loss(step(2)).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(RecipeError, match="drop --distill token"):
        recipe.setup(torch.nn.Identity(), Data(range(8)), SimpleNamespace(**{**vars(cfg), "mixup": 0.8}), rt)


def test_strong_augment_is_seeded_per_image_and_off_at_magnitude_zero():
    x = torch.randn(3, 1, 12, 12)
    rngs = lambda: [np.random.default_rng(s) for s in (1, 2, 3)]   # noqa: E731
    torch.testing.assert_close(strong_augment(x, rngs(), 0.0, 0.0), x)
    a, b = strong_augment(x, rngs(), 1.0, 1.0), strong_augment(x, rngs(), 1.0, 1.0)
    assert torch.equal(a, b) and not torch.allclose(a, x)
    # an image's augmentation does not depend on the rest of the batch (DDP splits it)
    torch.testing.assert_close(strong_augment(x[1:2], rngs()[1:2], 1.0, 1.0), a[1:2])


def test_options_and_refusals(tmp_path):
    r = parse_recipe("deitlt:drw=3,beta=0.999")
    assert isinstance(r, DeiTLT) and r.drw == 3.0 and format_recipe(r) == "deitlt:drw=3.0,beta=0.999"
    with pytest.raises(RecipeError, match="beta=1.5 must be in"):
        parse_recipe("deitlt:beta=1.5")
    kw = dict(model="vl_test_vit", data="synthetic:n=32,classes=4", epochs=1, batch_size=16, eval_val=False,
              progress=False, threads=1)
    with pytest.raises(RecipeError, match="--teacher CKPT --distill token"):
        fit(TrainConfig(out=str(tmp_path / "a"), recipe="deitlt", **kw))


KW = dict(model="vl_test_vit", data="synthetic:n=64,classes=4", epochs=1, batch_size=16, lr=0.05, opt="momentum",
          warmup_epochs=0, eval_val=False, progress=False, threads=1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return str(fit(TrainConfig(out=str(tmp_path_factory.mktemp("deitlt") / "teacher"), **KW)))


def test_fit_and_two_head_inference(tmp_path, teacher):
    run = fit(TrainConfig(out=str(tmp_path / "s"), teacher=teacher, distill="token", recipe="deitlt:drw=0.5", **KW))
    model = two_head_model(run)
    x = torch.randn(3, 1, 16, 16)
    model.train()
    cls, dist = model(x)
    model.eval()
    torch.testing.assert_close(model(x), (cls + dist) / 2)
    assert not torch.allclose(cls, dist)    # the two heads were trained on different targets
    with pytest.raises(RecipeError, match="drop --mixup"):
        fit(TrainConfig(out=str(tmp_path / "m"), teacher=teacher, distill="token", recipe="deitlt", mixup=0.8, **KW))


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path, teacher):
    args = ["train", "--model", "vl_test_vit", "--data", "synthetic:n=64,classes=4", "--batch-size", "16",
            "--epochs", "1", "--no-val", "--no-progress", "--threads", "1", "--lr", "0.05", "--opt", "momentum",
            "--teacher", teacher, "--distill", "token", "--recipe", "deitlt:drw=0.5"]   # both phases
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "vitlab", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                    "-m", "vitlab", *args, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    one, two = (torch.load(tmp_path / r / "train_state.pt", weights_only=True)["model"] for r in ("one", "two"))
    assert "dist_token" in one
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
