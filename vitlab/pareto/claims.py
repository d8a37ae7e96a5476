"""The claims ledger: each technique's headline claim in its paper beside what this run measured.

Claims are quoted from ../shared/SEED_CATALOG.md and ../shared/ANCHORS.md (the papers' abstracts and READMEs).
"""
from ..techniques import Kind, parse_apply, technique_kind

__all__ = ["CLAIMS", "component", "ledger"]

CLAIMS = {
    "tome": ("ToMe (Bolya et al., ICLR 2023)",
             "2x throughput for ViT-L@512 / ViT-H@518 off the shelf at -0.2 to -0.3 pt; r=13 on DeiT-S"),
    "evit": ("EViT (Liang et al., ICLR 2022)", "DeiT-S: +50 % speed at -0.3 pt (keep rate 0.7)"),
    "ats": ("ATS (Fayyaz et al., ECCV 2022)", "~2x fewer GFLOPs while preserving accuracy"),
    "mctf": ("MCTF (Lee et al., CVPR 2024)", "DeiT-T/S: -44 % FLOPs at +0.5 / +0.3 pt"),
    "w8a8": ("int8 deployment (ONNX Runtime / OpenVINO + NNCF class)",
             "real int8 kernels; this CPU's VNNI limit is about 4x"),
    "w8": ("int8 weight-only deployment", "smaller weights; speed-up depends on the engine"),
    "ptq": ("AdaLog (ECCV 2024) / MPTQ-ViT", "W4A4 with accuracy close to float on ViT/DeiT/Swin (simulated)"),
    "prune": ("NViT (Yang et al., CVPR 2023)", "DeiT-B: 2.6x fewer FLOPs, 1.9x speed-up, near-lossless"),
    "pruned": ("NViT (Yang et al., CVPR 2023)", "DeiT-B: 2.6x fewer FLOPs, 1.9x speed-up, near-lossless"),
}


def component(row: dict) -> str:
    """The kind of change a row makes: base, tokens, int8, simulated, pruned, or a stack of them."""
    parts = ["pruned"] if row["role"] == "candidate" else []
    for text in row["apply"]:
        kind = technique_kind(parse_apply([text])[0])
        name = text.split(":")[0]
        if kind == Kind.TOKENS:
            parts.append("tokens")
        elif kind == Kind.QUANTIZATION:
            parts.append("simulated" if name == "ptq" else "int8")
        else:
            parts.append("pruned")
    return " + ".join(parts) if parts else "base"


def ledger(rows: list[dict]) -> list[dict]:
    """One entry per technique in the run: its paper claim and each single-technique point measured here."""
    entries: dict[str, dict] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        names = [t.split(":")[0] for t in r["apply"]] + (["pruned"] if r["role"] == "candidate" else [])
        if len(names) != 1:
            continue
        name = names[0]
        paper, claim = CLAIMS.get(name, (name, "(no headline claim recorded)"))
        entry = entries.setdefault(name, {"technique": name, "paper": paper, "claim": claim, "here": []})
        label = r["techniques"] if r["apply"] else r["source"]
        entry["here"].append(f"{label}: {r['speedup']:.2f}x throughput at {-r['drop_pt']:+.2f} pt (val)")
    return list(entries.values())
