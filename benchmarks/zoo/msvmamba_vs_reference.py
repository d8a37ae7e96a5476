"""vitlab MSVMamba-Nano vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of YuHengsss/MSVMamba> archive HEAD classification/models kernels/selective_scan \
        | tar -x -C /tmp/official-msvmamba
    PYTHONPATH=<dir with einops> python benchmarks/zoo/msvmamba_vs_reference.py --official /tmp/official-msvmamba

The official vmamba.py (commit c394019) needs the CUDA extension `selective_scan_cuda_core`; on CPU its `fwd`
runs the official pure-PyTorch `selective_scan_ref`, taken unchanged (by ast) from
kernels/selective_scan/test_selective_scan.py, as the fixture does. `fvcore.nn` (flops helper only) is stubbed and
models/__init__.py skipped. The model is `VSSM` with configs/ms_vssm/vssm_nano_224_ms.yaml on config.py's defaults.
So the reference is the official network on its reference scan (a Python loop over positions), not on its CUDA
kernel: the ratio says how vitlab's CPU scan compares with the official code's only CPU path.

The official model gets seeded random weights (its own init, then trainable parameters + 0.02 * randn so that the
logits are of order 1), which vitlab's `checkpoint_filter_fn` converts; the logits are compared, then the two are
timed in `--rounds` A-B-B-A rounds of one forward pass per slot (benchmarks/zoo/_interleaved.py); the ratio is the
median of the per-round ratios, so a neighbour's load on a shared CPU hits both alike.
"""
import argparse
import sys
import types
import warnings
from pathlib import Path

import torch

import vitlab
from vitlab.models.msvmamba import checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report


NANO = dict(dims=48, depths=[1, 2, 5, 2], num_classes=1000, ssm_d_state=1, ssm_dt_rank="auto", ssm_ratio=2.0,
            ssm_rank_ratio=2.0, ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=True, ssm_drop_rate=0.0,
            ssm_simple_init=False, forward_type="v2", mlp_ratio=0.0, mlp_act_layer="gelu", mlp_drop_rate=0.0,
            drop_path_rate=0.0, patch_norm=True, norm_layer="ln", downsample_version="v1", patchembed_version="v1",
            use_checkpoint=False, sscore_type="multiscale_4scan_12", add_conv=True, add_se=True, convFFN=True,
            ffn_dropout=0.0, ms_stage=[0, 1, 2, 3], ms_split=[1, 3], sep_norm=False, ms_fusion=None,
            up_sample="interpolate")


def build_official(tree: Path, img_size: int):
    import ast
    fvcore_nn = types.ModuleType("fvcore.nn")
    fvcore_nn.FlopCountAnalysis = fvcore_nn.flop_count_str = fvcore_nn.flop_count = fvcore_nn.parameter_count = None
    sys.modules.setdefault("fvcore", types.ModuleType("fvcore"))
    sys.modules.setdefault("fvcore.nn", fvcore_nn)
    source = (tree / "kernels/selective_scan/test_selective_scan.py").read_text()
    ref = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "selective_scan_ref")
    namespace = {}
    exec("import torch\nimport torch.nn.functional as F\nfrom einops import rearrange, repeat", namespace)
    exec(compile(ast.Module(body=[ref], type_ignores=[]), "test_selective_scan.py", "exec"), namespace)
    kernel = types.ModuleType("selective_scan_cuda_core")
    kernel.fwd = lambda u, delta, A, B, C, D, delta_bias, softplus, nrows: (
        namespace["selective_scan_ref"](u, delta, A, B, C, D, None, delta_bias, softplus), None)
    sys.modules["selective_scan_cuda_core"] = kernel
    sys.path.insert(0, str(tree / "classification"))
    models = types.ModuleType("models")  # skip models/__init__.py (it imports the unreleased `heat`)
    models.__path__ = [str(tree / "classification/models")]
    sys.modules["models"] = models
    from models.vmamba import VSSM

    model = VSSM(**NANO)
    return model, model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True,
                        help="tree holding classification/models/ and kernels/selective_scan/")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="A-B-B-A rounds (see _interleaved.py)")
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecated import paths, re-registered model names
        torch.manual_seed(0)
        official, run_official = build_official(Path(args.official), args.img_size)
    official.eval()
    with torch.no_grad():  # away from the init (zero biases, unit norms, tiny classifier): logits of order 1
        generator = torch.Generator().manual_seed(1)
        for p in (p for p in official.parameters() if p.requires_grad):  # not frozen tables / identity kernels
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    ours = vitlab.create_model("vl_msvmamba_nano").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    with torch.inference_mode(), num_threads(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = run_official(x)
        diff = (ours(x) - reference).abs().max().item()
        print(f"max |official logit| {reference.abs().max().item():.3g}")
        result = interleaved_ratio(lambda: run_official(x), lambda: ours(x), rounds=args.rounds)
    print("official ran on: selective_scan_ref (the official pure-PyTorch scan; its CUDA kernel needs a GPU)")
    print(report(result, args.batch))
    print(f"ratio vitlab / official: {result.ratio:.2f}  (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    main()
