"""The technique registry, the --apply parser and stack-order errors."""
from dataclasses import dataclass

import pytest
import torch

import vitlab
from vitlab.techniques import (Kind, TechniqueError, apply_, applied_techniques, format_technique, parse_apply,
                               parse_technique, register_handler, register_technique, technique_from_dict,
                               technique_to_dict, unregister_technique)


@dataclass(frozen=True)
class Shrink:
    """Test structure technique: scales the head weights."""
    ratio: float = 0.5
    blocks: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")


@dataclass(frozen=True)
class Merge:
    """Test token technique."""
    r: int = 8
    trace: bool = False
    mode: str | None = None


@dataclass(frozen=True)
class Int8:
    """Test deployment technique."""


@pytest.fixture(autouse=True)
def registry():
    register_technique("t-shrink", Kind.STRUCTURE)(Shrink)
    register_technique("t-merge", Kind.TOKENS)(Merge)
    register_technique("t-int8", Kind.QUANTIZATION)(Int8)
    calls = []
    register_handler(Shrink)(lambda m, c: calls.append(("shrink", c)))
    register_handler(Merge)(lambda m, c: calls.append(("merge", c)))
    register_handler(Int8)(lambda m, c: calls.append(("int8", c)))
    yield calls
    for name in ("t-shrink", "t-merge", "t-int8"):
        unregister_technique(name)


def test_parse_types_and_round_trip():
    cfg = parse_technique("t-merge:r=13,trace=true,mode=none")
    assert cfg == Merge(r=13, trace=True, mode=None)
    assert parse_technique("t-shrink:ratio=0.25,blocks=1/3") == Shrink(0.25, (1, 3))
    assert parse_technique("T-MERGE") == Merge()
    assert format_technique(Merge(r=13)) == "t-merge:r=13"
    assert format_technique(Merge()) == "t-merge"
    for cfg in (Merge(r=3, trace=True), Shrink(0.1, (2,))):
        assert parse_technique(format_technique(cfg)) == cfg
        assert technique_from_dict(technique_to_dict(cfg)) == cfg


@pytest.mark.parametrize("text, needle", [
    ("nope:r=1", "unknown technique 'nope'"),
    ("t-merge:k=1", "unknown option 'k'; options are r, trace, mode"),
    ("t-merge:r=abc", "r='abc' is not a valid int"),
    ("t-merge:r", "has no value"),
    ("t-merge:r=1,r=2", "given twice"),
    ("t-shrink:ratio=1.5", "ratio must be in [0, 1), got 1.5"),
    ("t-merge:trace=maybe", "trace='maybe'"),
])
def test_parse_errors_name_the_value(text, needle):
    with pytest.raises(TechniqueError, match=None) as info:
        parse_technique(text)
    assert needle in str(info.value)


def test_stack_order_is_enforced_with_the_right_order_in_the_message():
    assert [type(c) for c in parse_apply(["t-shrink", "t-merge:r=2", "t-int8"])] == [Shrink, Merge, Int8]
    with pytest.raises(TechniqueError) as info:
        parse_apply(["t-merge", "t-shrink"])
    message = str(info.value)
    assert "t-shrink (structure (pruning)) cannot come after t-merge (tokens)" in message
    assert "structure (pruning) -> tokens -> quantization/deployment" in message
    with pytest.raises(TechniqueError, match="only one quantization"):
        parse_apply(["t-int8", "t-int8"])


def test_apply_runs_handlers_in_order_and_records_the_stack(registry, tiny_model):
    model = apply_(tiny_model, parse_apply(["t-shrink:ratio=0.1", "t-merge:r=2"]))
    assert model is tiny_model
    assert [name for name, _ in registry] == ["shrink", "merge"]
    assert applied_techniques(model) == (Shrink(0.1), Merge(r=2))
    # the stack already on the model counts: structure after tokens is refused
    with pytest.raises(TechniqueError, match="cannot come after"):
        apply_(model, Shrink())
    apply_(model, Int8())
    assert applied_techniques(model)[-1] == Int8()


def test_stack_is_saved_in_checkpoints(tmp_path, tiny_model):
    apply_(tiny_model, [Shrink(0.2)])
    vitlab.save_checkpoint(tiny_model, tmp_path / "ck")
    config = vitlab.load_config(tmp_path / "ck")
    assert config["techniques"] == [{"name": "t-shrink", "ratio": 0.2, "blocks": []}]
    # structure techniques are baked into the weights: recorded, not re-applied on load
    model = vitlab.create_model(tmp_path / "ck")
    assert applied_techniques(model) == (Shrink(0.2),)
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 10)
