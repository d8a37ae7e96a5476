"""The training-recipe hook (vitlab/engine/recipes.py): parsing, the step a recipe sees, extra parameters."""
from dataclasses import dataclass

import pytest
import torch

from vitlab.engine import TrainConfig, fit
from vitlab.engine.recipes import Recipe, RecipeError, Step, format_recipe, parse_recipe, register_recipe
from vitlab.engine.recipes import _RECIPES

SEEN: list[tuple[Step, float]] = []


@register_recipe("_test_scale")
@dataclass
class _Scale(Recipe):
    """Scales the default loss and trains one extra parameter towards `target`."""

    weight: float = 1.0
    target: float = 3.0

    def setup(self, model, train_set, cfg, rt) -> None:
        self.extra = torch.nn.Parameter(torch.zeros(()))

    def parameters(self):
        return [self.extra]

    def loss(self, step: Step) -> torch.Tensor:
        SEEN.append((step, self.extra.item()))
        return self.weight * step.default_loss() + (self.extra - self.target) ** 2


def test_parse_and_format():
    r = parse_recipe("_test_scale:weight=0.5")
    assert isinstance(r, _Scale) and r.weight == 0.5 and r.target == 3.0
    assert format_recipe(r) == "_test_scale:weight=0.5"
    assert format_recipe(parse_recipe("_test_scale")) == "_test_scale"


@pytest.mark.parametrize("text, words", [
    ("nope", "unknown recipe 'nope'"),
    ("_test_scale:wieght=1", "unknown option 'wieght'"),
    ("_test_scale:weight=abc", "weight='abc'"),
    ("_test_scale:weight", "has no value"),
])
def test_bad_recipe_text_is_named(text, words):
    with pytest.raises(RecipeError, match=words):
        parse_recipe(text)
    with pytest.raises(RecipeError, match=words):   # before any work
        TrainConfig(out="unused", model="vl_test_vit", recipe=text).validate()


def test_register_refuses_non_dataclass():
    with pytest.raises(TypeError, match="dataclass"):
        register_recipe("_bad")(type("Bad", (Recipe,), {}))
    assert "_bad" not in _RECIPES


def test_fit_calls_the_recipe_with_the_images_of_each_step(tmp_path):
    SEEN.clear()
    kw = dict(model="vl_test_vit", data="synthetic:n=64,classes=4", epochs=1, batch_size=16, lr=1e-3,
              warmup_epochs=0, hflip=0.0, clip_grad=None, eval_val=False, progress=False, threads=1)
    fit(TrainConfig(out=str(tmp_path / "a"), recipe="_test_scale:weight=1", **kw))
    steps = [s for s, _ in SEEN]
    extra = [e for _, e in SEEN]
    assert [s.global_step for s in steps] == list(range(len(steps))) and len(steps) >= 3
    # the indices name the images of the step: every image once per epoch
    flat = [i for s in steps for i in s.indices]
    assert len(flat) == len(set(flat)) == len(steps) * 16
    assert extra[0] == 0.0 and 0.0 < extra[-1] < 3.0   # the recipe's own parameter trained towards its target
    # weight=1 adds a term without model gradients: the model trains exactly as without the recipe
    SEEN.clear()
    fit(TrainConfig(out=str(tmp_path / "b"), **kw))
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert not SEEN
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    SEEN.clear()
    fit(TrainConfig(out=str(tmp_path / "c"), recipe="_test_scale:weight=0", **kw))
    c = load_file(tmp_path / "c" / "model.safetensors")
    # the recipe's loss is what trains the model: without the classification term only weight decay moves it
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3
