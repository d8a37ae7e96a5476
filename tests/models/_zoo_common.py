"""What the zoo family tests share: reading an official fixture (tests/fixtures/zoo/<family>/), and the two checks
every official-weights converter gets (its filter leaves vitlab's own layout alone; an official file becomes a
vitlab checkpoint that gives the official logits)."""
import json
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoint import load_weights, save_checkpoint

FIXTURES = Path(__file__).parents[1] / "fixtures" / "zoo"

FilterFn = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


def official_fixture(family: str, stem: str = "official_tiny"
                     ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(meta, input, official logits, official state dict) from `<stem>.json` and `<stem>.safetensors` of a family's
    fixture folder (the safetensors file keeps the input and logits as `__input__` and `__logits__`)."""
    meta = json.loads((FIXTURES / family / f"{stem}.json").read_text())
    state = load_file(str(FIXTURES / family / f"{stem}.safetensors"))
    return meta, state.pop("__input__"), state.pop("__logits__"), state


def meta_model(name: str, **kwargs) -> nn.Module:
    """`name` built on the meta device (no memory, no init): enough to count parameters and MACs at any size."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


def assert_setting_keeps_output(model: nn.Module, x: torch.Tensor, modules: list[nn.Module], name: str, value: Any,
                                tol: float = 1e-5) -> None:
    """`model(x)` is the same (to `tol`) after setting `name = value` on each of `modules`: a switch to another
    computation of the same function (manual attention for SDPA, a chunked MLP)."""
    with torch.no_grad():
        before = model(x)
        for module in modules:
            setattr(module, name, value)
        torch.testing.assert_close(model(x), before, atol=tol, rtol=tol)


def assert_filter_is_identity(model: nn.Module, filter_fn: FilterFn) -> None:
    """A converter's filter hands vitlab's own state dict back unchanged: the same keys and the very same tensors."""
    state = model.state_dict()
    out = filter_fn(state, model)
    assert out.keys() == state.keys() and all(out[k] is state[k] for k in state)


def assert_file_converts(tmp_path: Path, name: str, path: Path, filter_fn: FilterFn, x: torch.Tensor,
                         logits: torch.Tensor, **kwargs) -> nn.Module:
    """What `vitlab convert NAME FILE --out DIR --allow-pickle` runs, minus the CLI's module lookup: the official
    file at `path` loads into NAME(**kwargs) through `filter_fn` and saves as a vitlab checkpoint; the model rebuilt
    from that folder gives the official `logits` on `x` (to 1e-4). Returns the rebuilt model."""
    model = vitlab.create_model(name, **kwargs)
    load_weights(model, path, allow_pickle=True, filter_fn=filter_fn)
    save_checkpoint(model, tmp_path / "ckpt")
    again = vitlab.create_model(str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), logits, atol=1e-4, rtol=0)
    return again


def assert_official_file_converts(tmp_path: Path, name: str, saved: Any, filter_fn: FilterFn, x: torch.Tensor,
                                  logits: torch.Tensor, **kwargs) -> nn.Module:
    """`assert_file_converts` on official.pth holding `saved` (what the official training script writes)."""
    path = tmp_path / "official.pth"
    torch.save(saved, path)
    return assert_file_converts(tmp_path, name, path, filter_fn, x, logits, **kwargs)
