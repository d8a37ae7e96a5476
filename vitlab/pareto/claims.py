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
    "slim": ("Self-slimmed ViT (Zong et al., ECCV 2022)",
             "LV-ViT-S: 1.7x speed-up with negligible accuracy drop; 3.6x at 97 % of the performance"),
    "iared": ("IA-RED² (Pan et al., NeurIPS 2021)", "DeiT: up to 1.4x speed-up at < 0.7 pt accuracy loss"),
    "sparsifiner": ("Sparsifiner (Wei et al., CVPR 2023)",
                    "-48 to -69 % MHSA FLOPs within 0.4 pt (sparse attention; FLOPs, not wall-clock)"),
    "lookupvit": ("LookupViT (Koner et al., ECCV 2024)", "~2x fewer FLOPs at equal or better accuracy"),
    "w8a8": ("int8 deployment (ONNX Runtime / OpenVINO + NNCF class)",
             "real int8 kernels; this CPU's VNNI limit is about 4x"),
    "w8": ("int8 weight-only deployment", "smaller weights; speed-up depends on the engine"),
    "ptq": ("AdaLog (ECCV 2024) / MPTQ-ViT", "W4A4 with accuracy close to float on ViT/DeiT/Swin (simulated)"),
    "qhyvit": ("Q-HyViT (Lee et al., arXiv 2303.12557)",
               "hybrid ViTs: +17.73 % (8-bit) / +29.75 % (6-bit) top-1 on average over EasyQuant, FQ-ViT, PTQ4ViT, "
               "RepQ-ViT"),
    "prune": ("NViT (Yang et al., CVPR 2023)", "DeiT-B: 2.6x fewer FLOPs, 1.9x speed-up, near-lossless"),
    "pruned": ("NViT (Yang et al., CVPR 2023)", "DeiT-B: 2.6x fewer FLOPs, 1.9x speed-up, near-lossless"),
    "edvit": ("ED-ViT (Liu et al., arXiv 2410.11650)",
              "up to 28.9x / 34.1x model-size reduction at accuracy comparable to the original ViT; here "
              "(benchmarks/edvit.py): 2 class-wise pruned parts at 0.5x MACs each fuse to 88.40 % vs 89.60 % test, "
              "5 parts at 0.38x each to 87.38 %"),
    "paths": ("Path ensemble (Chang et al., ICCV 2023)",
              "some paths pull down accuracy; path pruning and EnsembleScale improve it (no number); here "
              "(benchmarks/paths.py): 89.60 % -> 89.53 % pruned, 89.58 % scaled (no gain)"),
    "deitlt": ("DeiT-LT (Rangwani et al., CVPR 2024)",
               "ViTs from scratch on long-tailed data, CIFAR-10-LT to iNaturalist-2018, via distillation from a CNN "
               "teacher on strongly augmented images: the distillation token becomes the tail expert (no number); "
               "here (benchmarks/deit_lt.py, Fashion-MNIST imbalance 100, 212 steps): tail 0.00 % (CE) -> 22.90 % "
               "(two heads; dist head 25.53 %), top-1 43.56 % -> 41.44 %; CE+DRW alone 55.14 % (tail 38.17 %)"),
    "glsim": ("GLSim (Rios et al., 2024)",
              "better fine-grained accuracy at much lower cost than alternatives (no number); here "
              "(benchmarks/glsim.py, Fashion-MNIST 56 px, frozen backbone): crop 85.85 % vs no crop 86.30 %"),
    "resformer": ("ResFormer (Tian et al., CVPR 2023)",
                  "ResFormer-B-MR (trained at 128/160/224): 75.86 % / 81.72 % at unseen 96 / 640 px, 48 % / 7.49 % "
                  "better than DeiT-B; here (benchmarks/resformer.py, GLPE vl_vit_fmnist d3 w64, 120 steps): "
                  "28/21/14 vs 28 only, test top-1 at 14/21/28/35 px 62.5/61.9/61.2/53.4 vs 37.9/48.2/61.3/50.3 %"),
    "sit": ("SiT (Atito et al., 2021)",
            "SSL pretraining (501 epochs in the official STL-10 recipe) lets ViTs beat training from scratch on "
            "small datasets; here "
            "(benchmarks/ssl_fewlabel.py, vl_vit_fmnist d3 w64, 160 steps of pretraining, 10 % labels): 61.28 / "
            "61.12 % vs 66.94 / 69.66 % from scratch (seeds 0 / 1: minutes of pretraining do not learn the rotation "
            "task)"),
    "tov-vicreg": ("TOV-VICReg (Goulão & Oliveira, 2022)",
                   "VICReg + temporal order verification gives the best representations and data efficiency on "
                   "Atari (no number); here (benchmarks/ssl_fewlabel.py, 100 steps of pretraining, 10 % labels): "
                   "70.09 / 69.29 % vs 66.94 / 69.66 % from scratch (seeds 0 / 1: +1.4 pt on average, within seed noise)"),
    "fastkd": ("TinyViT (Wu et al., ECCV 2022)",
               "fast pretraining distillation: sparse teacher logits stored once with the augmentation seeds and "
               "replayed, saving the teacher's forward in every epoch; TinyViT-21M 84.8 % (86.5 % at higher res); "
               "here (benchmarks/fastkd.py, reference teacher -> vl_vit_fmnist d2 w32, 1 epoch, 1 thread): replay "
               "27 vs online 82 CPU s/epoch (3.0x); test top-1 top-3 replay 81.46 % vs online 81.67 % vs none 81.40 %"),
}


SIMULATED = ("ptq", "qhyvit")   # fake-quantized in float: accuracy of the bit width, not int8 speed


def component(row: dict) -> str:
    """The kind of change a row makes: base, tokens, int8, bf16, simulated, pruned, or a stack of them."""
    parts = ["pruned"] if row["role"] == "candidate" else []
    for text in row["apply"]:
        kind = technique_kind(parse_apply([text])[0])
        name = text.split(":")[0]
        if kind == Kind.TOKENS:
            parts.append("tokens")
        elif kind == Kind.QUANTIZATION:
            parts.append("simulated" if name in SIMULATED else name if name == "bf16" else "int8")
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
