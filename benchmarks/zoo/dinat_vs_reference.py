"""vitlab DiNAT-Mini vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of SHI-Labs/Neighborhood-Attention-Transformer> archive HEAD classification \\
        | tar -x -C /tmp/official-dinat
    python benchmarks/zoo/dinat_vs_reference.py --official /tmp/official-dinat/classification

The official code needs NATTEN, which cannot be built for this torch (natten 0.17.5's sdist fails against torch
2.14's C++20 headers). If `import natten` fails, the official model runs on a stand-in `natten` module defined here:
natten 0.14's `NeighborhoodAttention2D` (pad to kernel*dilation, qkv, natten2dqkrpb, softmax, natten2dav, proj) with
the two ops written the straightforward PyTorch way (gather each query's k*k keys, einsum), i.e. what a user without
NATTEN's kernels would run. The script prints which one it used. The two implementations are timed in alternating
rounds and each keeps its best median, so a neighbour's load on a shared CPU hits both alike.
"""
import argparse
import contextlib
import importlib
import io
import sys
import types
import warnings
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab
from vitlab.models.dinat import checkpoint_filter_fn
from vitlab.profiling import num_threads, time_callable, tune_allocator


@lru_cache(maxsize=None)
def _tables(length: int, kernel_size: int, dilation: int):
    """NATTEN's window start (get_window_start) and rpb start (get_pb_start) per position, + k offsets."""
    nbhd, keys, bias = kernel_size // 2, [], []
    for i in range(length):
        residue, sub = i % dilation, i // dilation
        sub_len = (length + dilation - 1) // dilation
        sub_len -= 1 if residue >= dilation - (sub_len * dilation - length) else 0
        start = max(sub - nbhd, 0) + (sub + nbhd >= sub_len) * (sub_len - sub - nbhd - 1)
        keys.append([(start + t) * dilation + residue for t in range(kernel_size)])
        bias.append([kernel_size - 1 + (start + t - sub) for t in range(kernel_size)])
    return torch.tensor(keys), torch.tensor(bias)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    keys_h, bias_h = _tables(query.shape[2], kernel_size, dilation)
    keys_w, bias_w = _tables(query.shape[3], kernel_size, dilation)
    gathered = key[:, :, keys_h[:, None, :, None], keys_w[None, :, None, :]]  # (B, heads, H, W, k, k, d)
    scores = torch.einsum("bnxyd,bnxyijd->bnxyij", query, gathered)
    return (scores + rpb[:, bias_h[:, None, :, None], bias_w[None, :, None, :]]).flatten(-2)


def natten2dav(attn, value, kernel_size, dilation):
    keys_h, _ = _tables(value.shape[2], kernel_size, dilation)
    keys_w, _ = _tables(value.shape[3], kernel_size, dilation)
    gathered = value[:, :, keys_h[:, None, :, None], keys_w[None, :, None, :]].flatten(4, 5)
    return torch.einsum("bnxyk,bnxykd->bnxyd", attn, gathered)


class NeighborhoodAttention2D(nn.Module):
    """natten 0.14's module, on the ops above."""

    def __init__(self, dim, kernel_size, num_heads, attn_drop=0.0, proj_drop=0.0, dilation=None, bias=True,
                 qkv_bias=True, qk_scale=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size, self.dilation = kernel_size, dilation or 1
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, Hp, Wp, C = x.shape
        window = self.kernel_size * self.dilation
        x = F.pad(x, (0, 0, 0, max(0, window - Wp), 0, max(0, window - Hp)))
        _, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = natten2dqkrpb(q, k, self.rpb, self.kernel_size, self.dilation).softmax(dim=-1)
        x = natten2dav(attn, v, self.kernel_size, self.dilation).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(x[:, :Hp, :Wp])


def _natten_or_stand_in() -> str:
    try:
        importlib.import_module("natten")  # the official code imports it
        return "natten"
    except ImportError:
        stand_in = types.ModuleType("natten")
        stand_in.NeighborhoodAttention2D = NeighborhoodAttention2D
        sys.modules["natten"] = stand_in
        return "pure-PyTorch gather stand-in for natten"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="exported official classification/ folder (nat.py, dinat.py)")
    parser.add_argument("--variant", default="mini", help="mini | tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    reference_ops = _natten_or_stand_in()
    sys.path.insert(0, args.official)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import dinat

        torch.manual_seed(0)
        official = getattr(dinat, f"dinat_{args.variant}")().eval()
    ours = vitlab.create_model(f"vl_dinat_{args.variant}").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode(), num_threads(args.threads):
        diff = (ours(x) - official(x)).abs().max().item()
        best = {}
        for _ in range(args.rounds):
            for name, model in (("official", official), ("vitlab", ours)):
                timing = time_callable(lambda: model(x), warmup=1, min_runs=3, min_time_s=3.0, max_time_s=20.0)
                best[name] = min(best.get(name, float("inf")), timing.median_s)
    vitlab_op = ours.stages[0].blocks[0].attn.last_backend
    print(f"official ran on: {reference_ops}; vitlab ran on: {vitlab_op} neighborhood attention")
    for name, seconds in best.items():
        print(f"{name:9s} {args.batch / seconds:8.1f} img/s  (best median {seconds * 1e3:.1f} ms / batch {args.batch})")
    print(f"ratio vitlab / official: {best['official'] / best['vitlab']:.2f}  (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    main()
