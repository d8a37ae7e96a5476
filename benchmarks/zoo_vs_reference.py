"""Run every benchmarks/zoo/<family>_vs_reference.py and print one table of vitlab / reference speed ratios.

    PYTHONPATH=/tmp/zoo-extra python benchmarks/zoo_vs_reference.py [--threads 2] [--official-root /tmp] [--rounds N]
        [--only rmt spectformer]

Runs FAMILIES (the ten families of the first zoo table), then FAMILIES_WAVE2 (the zoo's second wave: the families
with official code). Each family script builds vitlab's smallest variant and the reference it was checked against
with the same weights, checks they agree, and times them in alternating rounds at 224 px, batch 8 (see each
script; GMM-ViT: 32 px, batch 64; TiC: one MSA-Conv layer). The references: HF transformers for CvT and PVT
(always run) and the official code exported to `<official-root>/official-<family>` (see each script's docstring for
the `git archive` line; the official code is not part of vitlab). A family whose export is missing is listed as
skipped, with the folder it looked for. A ratio above 1 means vitlab is faster.
`--rounds` overrides every script's own default number of rounds (fewer rounds: quicker, noisier); what a round is
differs: RMT, SpectFormer and the wave-2 scripts time A-B-B-A rounds of one forward pass per slot and report the
median per-round ratio (benchmarks/zoo/_interleaved.py), the others keep each model's best median over rounds of
>= 3 s per model.
`--only` (or `--families`) runs some families, named by label (RMT-T) or script name (rmt); `wave1` / `wave2` name
all of FAMILIES / FAMILIES_WAVE2.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


@dataclass(frozen=True)
class Family:
    label: str  # smallest variant, as in the zoo table
    script: str  # file in benchmarks/zoo/
    official: str  # folder under --official-root, plus the sub-folder the script wants
    official_optional: bool = False  # True: the script also runs without --official (HF reference)


FAMILIES = (
    Family("CvT-13", "cvt_vs_reference.py", "official-cvt", official_optional=True),
    Family("PVT-Tiny", "pvt_vs_reference.py", "official-pvt", official_optional=True),
    Family("DiNAT-Mini", "dinat_vs_reference.py", "official-dinat/classification"),
    Family("T2T-ViT-7", "t2t_vit_vs_reference.py", "official-t2t"),
    Family("HorNet-T 7x7", "hornet_vs_reference.py", "official-hornet"),
    Family("UniFormer-S", "uniformer_vs_reference.py", "official-uniformer"),
    Family("CrossFormer-T", "crossformer_vs_reference.py", "official-crossformer"),
    Family("RMT-T", "rmt_vs_reference.py", "official-rmt"),
    Family("SpectFormer-T", "spectformer_vs_reference.py", "official-spectformer"),
    Family("SReT-T", "sret_vs_reference.py", "official-sret"),
)
# zoo wave 2 (benchmarks/zoo_table.py's ZOO_WAVE2): the families with official code, run after FAMILIES by default.
# GMM-ViT is a 32-px CIFAR model (timed at 32 px, batch 64); TiC's repository has the MSA-Conv layer only (one layer
# is timed); TurboViT has no code (its Hiera-style proxy is timed against the official Hiera). ViR, GGeM and the
# abstract-only families have no script.
FAMILIES_WAVE2 = (
    Family("ChannelViT-T/16", "channelvit_vs_reference.py", "official-channelvit"),
    Family("FcaFormer-L1", "fcaformer_vs_reference.py", "official-fcaformer"),
    Family("FaViT-B0", "favit_vs_reference.py", "official-favit"),
    Family("SOFT-Tiny", "soft_vs_reference.py", "official-soft"),
    Family("SVT-S", "svt_vs_reference.py", "official-svt"),
    Family("SG-Former-S", "sgformer_vs_reference.py", "official-sgformer"),
    Family("MSVMamba-Nano", "msvmamba_vs_reference.py", "official-msvmamba"),
    Family("GMM-ViT", "gmm_vit_vs_reference.py", "official-gmm_vit"),
    Family("STViT-S", "stvit_vs_reference.py", "official-stvit"),
    Family("UniFormer-XXS", "uniformer_light_vs_reference.py", "official-uniformer_light"),
    Family("CrossFormer++-S", "crossformer_pp_vs_reference.py", "official-crossformer_pp"),
    Family("TiC-T", "tic_vs_reference.py", "official-tic"),
    Family("TurboViT-proxy", "turbovit_vs_reference.py", "official-turbovit"),
)
ALL_FAMILIES = FAMILIES + FAMILIES_WAVE2

_RATIO = re.compile(r"^ratio vitlab / (\S+?)(?: \(img/s\))?: ([0-9.]+)", re.MULTILINE)
_DIFF = re.compile(r"max \|logits? diff\|[^0-9]*([0-9.]+e[-+][0-9]+)")
_RAN_ON = re.compile(r"^official ran on: (.*)$", re.MULTILINE)


def parse_output(text: str) -> dict:
    """{"ratios": {reference: vitlab/reference img/s}, "max_diff": largest logit difference, "note": str}."""
    ratios = {ref: float(value) for ref, value in _RATIO.findall(text)}
    diffs = [float(d) for d in _DIFF.findall(text)]
    ran_on = _RAN_ON.search(text)
    return {"ratios": ratios, "max_diff": max(diffs) if diffs else None,
            "note": f"official ran on {ran_on.group(1)}" if ran_on else ""}


def family_key(family: Family) -> str:
    """The short name of a family: its script's name without `_vs_reference.py` (cvt, pvt, ..., rmt, spectformer)."""
    return family.script.removesuffix("_vs_reference.py")


def _selected(family: Family, names) -> bool:
    waves = {"wave1": FAMILIES, "wave2": FAMILIES_WAVE2}
    return any(name.lower() in (family.label.lower(), family_key(family)) or family in waves.get(name.lower(), ())
               for name in names)


def command(family: Family, args) -> list[str] | None:
    """The script's command line, or None if its official export is missing and it needs one."""
    cmd = [sys.executable, str(ZOO_DIR / family.script), "--threads", str(args.threads)]
    if args.rounds is not None:
        cmd += ["--rounds", str(args.rounds)]
    official = Path(args.official_root) / family.official
    if official.is_dir():
        cmd += ["--official", str(official)]
    elif not family.official_optional:
        return None
    return cmd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--official-root", default="/tmp", help="folder holding the official-<family> exports")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per script (default: each script's own)")
    parser.add_argument("--families", "--only", nargs="+", default=None,
                        help="families to run, by label or script name, e.g. RMT-T SpectFormer-T or rmt spectformer")
    args = parser.parse_args(argv)
    families = ALL_FAMILIES if args.families is None else [f for f in ALL_FAMILIES if _selected(f, args.families)]
    unknown = [name for name in args.families or () if not any(_selected(f, [name]) for f in ALL_FAMILIES)]
    if unknown:
        parser.error(f"unknown family {unknown}: choose from {[f.label for f in ALL_FAMILIES]} "
                     f"or {[family_key(f) for f in ALL_FAMILIES]}")

    rows = []
    for family in families:
        cmd = command(family, args)
        if cmd is None:
            rows.append((family, None, f"skipped: no official export at {Path(args.official_root) / family.official}",
                         0.0))
            print(f"{family.label}: skipped", flush=True)
            continue
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        seconds = time.perf_counter() - start
        print(f"{family.label} ({seconds:.0f} s):\n{proc.stdout.strip()}", flush=True)
        if proc.returncode != 0:
            error = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            rows.append((family, None, f"failed (exit {proc.returncode}): {error}", seconds))
            continue
        rows.append((family, parse_output(proc.stdout), "", seconds))

    print(f"\n224 px, batch 8, {args.threads} threads; ratio = vitlab img/s / reference img/s (> 1: vitlab faster)")
    print("| family (smallest variant) | reference | vitlab / reference | max logit diff | notes |")
    print("|---|---|---|---|---|")
    for family, parsed, error, seconds in rows:
        if parsed is None:
            print(f"| {family.label} | | | | {error} |")
            continue
        refs = " / ".join(parsed["ratios"]) or "?"
        ratios = " / ".join(f"{r:.2f}" for r in parsed["ratios"].values()) or "no ratio printed"
        diff = f"{parsed['max_diff']:.1e}" if parsed["max_diff"] is not None else ""
        print(f"| {family.label} | {refs} | {ratios} | {diff} | {parsed['note']} {seconds:.0f} s |")


if __name__ == "__main__":
    main()
