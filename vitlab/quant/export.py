"""Save and reload quantized models; export float or quantized models to ONNX / OpenVINO IR.

A saved quantized model is a checkpoint folder (`vitlab.save_checkpoint`) whose `model.safetensors` also holds
every quantizer's parameters (scale, zero-point, ... as buffers: no pickle), and whose `config.json` has a
"quantization" section: {"format": "vitlab-quant", "kind": "simulated" | "openvino", "bits": {quantizer: bits},
"ir": "model.xml"}. A deployed model (w8a8 / w8) also has the engine graph, `model.xml` / `model.bin` (OpenVINO
IR, f32 weights + FakeQuantize ranges). `vitlab.create_model(DIR)` reloads either: a simulated model as a
PyTorch module in mode "quant", a deployed one as an `OpenVINORunner`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..record import update_record
from ..checkpoint import (CheckpointError, _build_from_config, _read_state_dict, check_state_dict, checkpoint_file,
                          create_model, load_config, model_spec, refuse_out_over_source, register_format,
                          save_checkpoint, techniques_from_config)
from ..errors import UserError, one_line
from ..runner import example_shape
from .. import loader
from ..techniques import Kind, TechniqueError, apply_stack, parse_apply, reapply_on_load, technique_kind
from ..utils.io import atomic_write_json
from .calibration import prepare_
from .configs import BF16, PTQ
from .deploy import OnnxRuntimeRunner, OpenVINORunner, _ov, save_ir, to_onnx, to_openvino
from .sim import is_quantized, quantizers

__all__ = ["save_quantized", "load_quantized", "export_model", "QUANT_FORMAT"]

QUANT_FORMAT = "vitlab-quant"
WEIGHTS = "model.safetensors"
IR = "model.xml"


def _quantizer_state(model: nn.Module) -> dict[str, dict]:
    state = {"bits": {name: q.bits for name, q in quantizers(model)},
             "modes": {name: q.mode for name, q in quantizers(model)}}
    if getattr(model, "quant_input_size", None):   # the input the quantized sites were counted on (coverage.settle_)
        state["input_size"] = list(model.quant_input_size)
    return state


def save_quantized(model_or_runner: Any, directory: str | Path, **checkpoint_kwargs) -> Path:
    """Save a calibrated simulated model (PTQ) or a deployed OpenVINORunner (w8a8 / w8) into `directory`."""
    directory = Path(directory)
    stack = tuple(getattr(model_or_runner, "techniques", None) or ())
    if stack and isinstance(stack[-1], BF16):
        # bf16 has no state of its own: the float weights, with bf16 in the stack, re-deployed when they load
        module = getattr(model_or_runner, "float_module", None) or model_or_runner.module
        update_record(module, techniques=stack)
        return save_checkpoint(module, directory, **checkpoint_kwargs)
    if isinstance(model_or_runner, (OpenVINORunner, OnnxRuntimeRunner)):
        runner = model_or_runner
        module = runner.sim_module if runner.sim_module is not None else runner.float_module
        spec = model_spec(runner.float_module)
        update_record(module, techniques=tuple(runner.techniques))
        save_checkpoint(module, directory, model_name=spec["name"], model_kwargs=spec["kwargs"], **checkpoint_kwargs)
        graph = runner.save(directory, Path(IR).stem).name  # model.xml (OpenVINO) or model.onnx (ONNX Runtime)
        kind = "onnxruntime" if isinstance(runner, OnnxRuntimeRunner) else "openvino"
        section = {"kind": kind, "engine": runner.engine, "ir": graph, "simulated_twin": runner.sim_module is not None,
                   **_quantizer_state(module)}
    elif isinstance(model_or_runner, nn.Module) and is_quantized(model_or_runner):
        save_checkpoint(model_or_runner, directory, **checkpoint_kwargs)
        section = {"kind": "simulated", **_quantizer_state(model_or_runner)}
    else:
        raise CheckpointError(f"save_quantized: {type(model_or_runner).__name__} is neither a quantized model nor a "
                              "deployed runner; save float models with vitlab.save_checkpoint")
    config = load_config(directory)
    config["quantization"] = {"format": QUANT_FORMAT, "version": 1, **section}
    atomic_write_json(directory / "config.json", config)
    return directory


def load_quantized(directory: str | Path, **kwargs):
    """Rebuild what `save_quantized` wrote: a PyTorch module (simulated) or an OpenVINORunner (deployed).

    Every file comes from inside `directory` (config.json's "ir" included: `checkpoint_file`), every tensor must
    match the rebuilt model's names, shapes and dtypes, and a missing or damaged graph is a CheckpointError naming
    the file (never an engine traceback)."""
    directory = Path(directory)
    config = load_config(directory)
    section = config.get("quantization") or {}
    config_path = directory / "config.json"
    if section.get("format") != QUANT_FORMAT:
        raise CheckpointError(f"{directory}: config.json has no vitlab quantization section")
    kind = section.get("kind")
    if kind not in ("simulated", "onnxruntime", "openvino"):
        raise CheckpointError(f"{config_path}: \"quantization.kind\" is {kind!r}, not simulated, onnxruntime or "
                              "openvino; the checkpoint is damaged: re-create it with vitlab quantize")
    stack = tuple(techniques_from_config(directory, config))

    def build() -> nn.Module:  # the float model with the techniques that re-apply on load (token reduction)
        m = _build_from_config(directory, config, kwargs).eval()
        return apply_stack(m, [t for t in stack if reapply_on_load(t)])

    model = build()
    quant_cfg = stack[-1] if stack else None
    if not isinstance(quant_cfg, PTQ) and not hasattr(quant_cfg, "ptq"):
        raise CheckpointError(f"{config_path}: a quantized checkpoint's last technique must be its quantization "
                              f"(ptq, w8a8, w8), got {config.get('techniques')!r}; re-create it with vitlab quantize")
    weights = checkpoint_file(directory, WEIGHTS)
    state = _read_state_dict(weights, allow_pickle=False)
    twin_cfg = quant_cfg if isinstance(quant_cfg, PTQ) else (
        quant_cfg.ptq() if section.get("simulated_twin") else None)
    if kind == "simulated" and twin_cfg is None:
        raise CheckpointError(f"{config_path}: a simulated quantized checkpoint needs a ptq technique, got "
                              f"{config.get('techniques')!r}; re-create it with vitlab quantize")
    float_state = {k: v for k, v in state.items() if k in model.state_dict()}
    if twin_cfg is None:
        check_state_dict(float_state, model.state_dict(), weights)
        model.load_state_dict(float_state)
        sim = None
    else:
        float_model = build()
        check_state_dict(float_state, float_model.state_dict(), weights)
        float_model.load_state_dict(float_state)
        size = section.get("input_size")
        try:
            example = torch.zeros(1, *(int(v) for v in size)) if size else None
        except (TypeError, ValueError):
            raise CheckpointError(f"{config_path}: \"quantization.input_size\" is {size!r}, not (C, H, W); the "
                                  "checkpoint is damaged: re-create it with vitlab quantize") from None
        prepare_(model, twin_cfg, example=example)
        try:
            bits = section.get("bits", {})
            for name, q in quantizers(model):
                if name in bits:
                    q.set_bits(int(bits[name]))
        except (UserError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config_path}: \"quantization.bits\" {one_line(e)}; the checkpoint is damaged: "
                                  "re-create it with vitlab quantize") from None
        # the quantizers' scales and zero points too; their per-channel shapes come from the file
        adopt = {f"{name}.{b}" for name, q in quantizers(model) for b, _ in q.named_buffers(recurse=False)}
        check_state_dict(state, model.state_dict(), weights, adopt_shapes=adopt)
        model.load_state_dict(state, strict=True)
        modes = section.get("modes", {})
        try:
            for name, q in quantizers(model):
                q.calibrated = modes.get(name, "quant") == "quant"
                q.set_mode(modes.get(name, "quant"))
        except UserError as e:
            raise CheckpointError(f"{config_path}: \"quantization.modes\": {one_line(e)}") from None
        update_record(model, techniques=stack, checkpoint={"path": str(directory), "config": config})
        sim = model
        model = float_model
    update_record(model, checkpoint={"path": str(directory), "config": config})
    if kind == "simulated":
        return sim
    threads = getattr(quant_cfg, "threads", None)
    graph_name = section.get("ir", IR if kind == "openvino" else "model.onnx")
    graph = checkpoint_file(directory, graph_name, '"quantization.ir"')
    files = [graph] + ([checkpoint_file(directory, str(Path(graph_name).with_suffix(".bin")))]
                       if kind == "openvino" else [])
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{directory}: the engine graph {f.name} that config.json names is missing; "
                                  "re-create the checkpoint with vitlab quantize")
    try:
        if kind == "onnxruntime":
            return OnnxRuntimeRunner(_embedded_onnx(graph), model, stack, section.get("engine", "onnxruntime-int8"),
                                     threads, sim)
        ov_model = _ov().Core().read_model(str(graph))
        return OpenVINORunner(ov_model, model, stack, section.get("engine", "openvino-int8"), threads, sim)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (each engine raises its own types for a damaged graph)
        raise CheckpointError(f"cannot load the engine graph {graph}: {type(e).__name__}: {one_line(e)[:300]}; "
                              "the file is damaged: re-create the checkpoint with vitlab quantize") from None


register_format("quantization", load_quantized)   # vitlab.create_model(DIR) hands such folders to load_quantized


def _embedded_onnx(path: Path) -> bytes:
    """The ONNX graph at `path`, refused if any tensor lives in an external data file: vitlab's graphs embed their
    weights, and an external location is a path the checkpoint does not control (ONNX Runtime would resolve it
    against the working directory)."""
    import onnx

    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise CheckpointError(f"cannot load the engine graph {path}: {type(e).__name__}: {e}; the file is damaged: "
                              "re-create the checkpoint with vitlab quantize") from None

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = next((e.value for e in t.external_data if e.key == "location"), "?")
            raise CheckpointError(f"checkpoint refers to a file outside it: the engine graph {path} keeps tensor "
                                  f"{t.name!r} in an external file {where!r}; vitlab's graphs embed their weights: "
                                  "re-create the checkpoint with vitlab quantize")
    return data


def export_model(model_or_runner: Any, directory: str | Path, fmt: str, example: torch.Tensor | None = None) -> Path:
    """Write the model as ONNX (`model.onnx`) or OpenVINO IR (`model.xml`/`.bin`) into `directory`.

    A deployed OpenVINORunner exports its int8 graph (IR only). A module (float, or simulated-quantized: its
    uniform fake quantizers become Q/DQ pairs in ONNX and FakeQuantize nodes in OpenVINO) is traced on `example`
    (default: zeros of the model's input size) with a dynamic batch dimension.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt not in ("onnx", "openvino"):
        raise ValueError(f"export format {fmt!r} is not one of onnx, openvino")
    if isinstance(model_or_runner, OnnxRuntimeRunner):
        if fmt != "onnx":
            raise ValueError("a model deployed to ONNX Runtime (w8a8's default engine where it is installed) "
                             "exports as --format onnx; for OpenVINO IR deploy with --apply w8a8:engine=openvino")
        return model_or_runner.save(directory, "model")
    if isinstance(model_or_runner, OpenVINORunner):
        if fmt != "openvino":
            raise ValueError("a deployed OpenVINO model exports as --format openvino; export the simulated model "
                             "(ptq) or the float model to ONNX")
        return model_or_runner.save(directory, "model")
    model = model_or_runner.eval()
    example = torch.zeros(1, *example_shape(model)) if example is None else example[:1]
    if fmt == "openvino":
        return save_ir(to_openvino(model, example), directory, "model")
    return to_onnx(model, example, directory / "model.onnx")


def is_quantized_checkpoint(config: dict) -> bool:
    return (config.get("quantization") or {}).get("format") == QUANT_FORMAT


def quantize_checkpoint(source: str, out: str | Path, apply: list[str], *, data: str | None = None,
                        split: str = "train", calib_images: int = 256, data_dir: str | None = None):
    """`vitlab quantize`: load `source`, apply the stack (calibrating on `calib_images` seeded images of
    `data`/`split`; never the test split), save the quantized model (or deployed runner) into `out`."""
    refuse_out_over_source(out, source)
    if split == "test":  # vitlab quantize / export name this split --split (eval's is --calib-split)
        raise TechniqueError("--split test: calibration on the test split is refused (it would leak into the "
                             "reported accuracy): use --split train (default) or val")
    configs = parse_apply(list(apply))
    if not any(technique_kind(c) == Kind.QUANTIZATION for c in configs):
        raise TechniqueError("vitlab quantize needs a quantization technique: --apply ptq:w=8,a=8 (simulated), "
                             "--apply w8a8 or --apply w8 (deployed to OpenVINO)")
    result = loader.load(source, configs, calibration=loader.Calibration(data, split, calib_images, data_dir,
                                                                          split_flag="--split"),
                         missing_data=lambda stack: TechniqueError(
                             "quantization calibrates on images: give --data SPEC (calibration images come from "
                             "--split train or val)"))
    calib_info = {"data": data, "split": split, "images": calib_images} \
        if loader.stack_needs_calibration(configs) else {}
    save_quantized(result, out, data={"calibration": calib_info})
    return result


def export_checkpoint(source: str, out: str | Path, fmt: str, apply: list[str] = (), *, data: str | None = None,
                      split: str = "train", calib_images: int = 256, data_dir: str | None = None) -> Path:
    """`vitlab export`: a model / checkpoint (+ an optional technique stack) -> ONNX or OpenVINO IR in `out`."""
    refuse_out_over_source(out, source)
    if apply:
        result = quantize_checkpoint(source, Path(out) / "checkpoint", apply, data=data, split=split,
                                     calib_images=calib_images, data_dir=data_dir)
    else:
        result = create_model(source)
    return export_model(result, out, fmt)
