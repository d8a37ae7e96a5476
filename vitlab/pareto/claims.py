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
    "expedit": ("Expedit (Liang et al., NeurIPS 2022)",
                "large ViTs / Swins for dense prediction expedited without fine-tuning (no number in the abstract); "
                "here (benchmarks/expedit_speed.py, Fashion-MNIST Swins at 64 / 128 px, no fine-tuning): >= 1.28x "
                "fewer MACs costs 1.2-6.5 pt val top-1, and settings within 1 pt save 5-10 % of the MACs "
                "(1.07-1.10x): not reproduced on small models"),
    "slim": ("Self-slimmed ViT (Zong et al., ECCV 2022)",
             "LV-ViT-S: 1.7x speed-up with negligible accuracy drop; 3.6x at 97 % of the performance"),
    "iared": ("IA-RED² (Pan et al., NeurIPS 2021)", "DeiT: up to 1.4x speed-up at < 0.7 pt accuracy loss"),
    "sparsifiner": ("Sparsifiner (Wei et al., CVPR 2023)",
                    "-48 to -69 % MHSA FLOPs within 0.4 pt (sparse attention; FLOPs, not wall-clock)"),
    "lookupvit": ("LookupViT (Koner et al., ECCV 2024)", "~2x fewer FLOPs at equal or better accuracy"),
    "topvim": ("ToP-ViM (Zhan, Kong et al., NeurIPS 2024)",
               "PlainMamba-L3: 81.7 % top-1 at -41.6 % FLOPs; hidden-state alignment beats plain token removal; "
               "here (benchmarks/tokens_topvim.py, Vim w32 d6 on Fashion-MNIST, 1 thread): from a converged "
               "6,000-step base, keep 0.5 after block 2 ends at 86.30 % vs 88.80 % for the unpruned model after the "
               "same 2,500 fine-tuning steps, at 1.45x (-2.50 pt; from a 1,500-step base -2.55 pt at 1.34x); "
               "pruning after block 3 instead: -1.95 pt at 1.30x (keep 0.5), -2.15 pt at 1.34x (keep 0.4); "
               "alignment beats plain removal by 1.05-1.1 pt after 300 steps"),
    "w8a8": ("int8 deployment (ONNX Runtime / OpenVINO + NNCF class)",
             "real int8 kernels; this CPU's VNNI limit is about 4x"),
    "w8": ("int8 weight-only deployment", "smaller weights; speed-up depends on the engine"),
    "ptq": ("AdaLog (ECCV 2024) / MPTQ-ViT",
            "W4A4 with accuracy close to float on ViT/DeiT/Swin (simulated); here (benchmarks/quant_adv_accuracy.py, "
            "a deit-small-shaped ViT trained on Fashion-MNIST, float 81.45 %, 2,000 test images): AdaLog W4A4 "
            "80.80 % (min-max 68.65, MSE 79.40) and W3A3 76.85 % (min-max 63.75, MSE 71.80); on reference v4 and "
            "the 196-token model the MSE-uniform control matches or beats it"),
    "repq": ("RepQ-ViT (Li et al., ICCV 2023)",
             "DeiT-S W4A4 69.03 % top-1 (official README; float 79.85) without reconstruction: per-channel "
             "post-LayerNorm scales reparameterized into the LayerNorm and the next Linear, log-sqrt(2) softmax; "
             "here (benchmarks/quant_adv_accuracy.py, simulated, 10,000 test images): W4A4 88.22 % vs float "
             "91.88 % on reference v4 (min-max 87.65, AdaLog 87.91, log-sqrt(2) alone 87.99) and 77.90 % vs 88.53 % "
             "on the 196-token model (min-max 63.82, MSE 75.47, AdaLog 71.97): the best 4-bit config on both; "
             "80.85 % vs float 81.45 % on a deit-small-shaped model (AdaLog 80.80, min-max 68.65; 2,000 images); "
             "W3A3 27 / 15 % (7 log-sqrt(2) levels reach only 2^-3, so most attention probabilities round to 0; "
             "the paper reports 4 and 6 bits)"),
    "qhyvit": ("Q-HyViT (Lee et al., arXiv 2303.12557)",
               "hybrid ViTs: +17.73 % (8-bit) / +29.75 % (6-bit) top-1 on average over EasyQuant, FQ-ViT, PTQ4ViT, "
               "RepQ-ViT"),
    "shiftadd": ("ShiftAddViT (You et al., NeurIPS 2023)",
                 "up to 5.18x GPU latency and 42.9 % energy saving at comparable accuracy (TVM kernels, 100-epoch "
                 "fine-tune); here (benchmarks/shiftadd_finetune.py): 5-bit shift linears alone -0.05 pt with no "
                 "fine-tuning; binary attention + MoE 85.63 % vs 90.80 % float after 400 steps, 42 % of tokens on "
                 "shift experts; speed not reproducible on CPU (simulated)"),
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
    "ecl": ("EventTransAct (de Blegiers et al., IROS 2023)",
            "VTN + Event-Contrastive Loss + event augmentations: N-EPIC-Kitchens 74.9 % (seen), 42.43 / 46.66 % "
            "(unseen); here (benchmarks/video_eventtransact.py, vl_eventtransact_mfmnist, "
            "moving-fashion-mnist-events, 200 steps): CE 44.1 / 45.5 % val / test, CE + ECL 17.2 / 16.9 % (weight 1), "
            "22.5 / 21.6 % (weight 0.1): at this scale the ECL gradient swamps CE, which barely leaves chance"),
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
    "eco-m2f": ("ECO-M2F (Yao et al., 2024)",
                "per-image encoder depth in Mask2Former: lower expected encoder GFLOPs at maintained PQ on COCO / "
                "Cityscapes (README: PQ 52.06 at 202 total GFLOPs, Swin-T, beta 0.0005); here "
                "(benchmarks/dense_eco_m2f.py, HF Mask2Former with six decoder layers over the reference-v2 ViT, "
                "64 px fmnist-scenes, Muon lr 5e-3, 1200 steps x 8, official exit weights and soft gate targets, seeds "
                "0/1/2, 1 thread): every seed segments things (val PQ 14.13 / 14.62 / 12.48 at depth 6); expected "
                "depth <= 4.5 within 1 pt of depth 6 in 2 of 3 seeds (seed 1: 4.05 layers, -0.92 PQ; seed 2: 3.64, "
                "+0.30 and 2.17, -0.13; seed 0: -1.65 at 3.26); the gate above the line between neighbouring fixed "
                "depths at 4 of 9 points: partly reproduced. HF's Swin from scratch, two decoder layers or Muon lr "
                "1e-2 (seeds 1, 2) predict the background only"),
    "fastkd": ("TinyViT (Wu et al., ECCV 2022)",
               "fast pretraining distillation: sparse teacher logits stored once with the augmentation seeds and "
               "replayed, saving the teacher's forward in every epoch; TinyViT-21M 84.8 % (86.5 % at higher res); "
               "here (benchmarks/fastkd.py, reference teacher -> vl_vit_fmnist d2 w32, 1 epoch, 1 thread): replay "
               "27 vs online 82 CPU s/epoch (3.0x); test top-1 top-3 replay 81.46 % vs online 81.67 % vs none 81.40 %"),
    "resnas-evolution": ("ViT-ResNAS (Liao et al., 2021)",
                         "evolution's best >= random search's at equal evaluations; here (benchmarks/search_resnas.py, "
                         "5M-MAC budget, 24 nets each, val acc with supernet weights, seeds 0/1/2): 76.8/76.2/77.5 % "
                         "vs 77.1/75.8/77.6 % (NSGA-II 76.7/75.9/77.3 %): not reproduced (1 of 3 seeds; gaps <= 0.4 "
                         "pt)"),
    "resnas-searched": ("ViT-ResNAS (Liao et al., 2021)",
                        "the searched net, retrained, beats a hand-designed ViT of <= its MACs (better accuracy-MACs "
                        "than DeiT); here (benchmarks/search_resnas.py, 300 steps from scratch, test, seeds 0/1/2): "
                        "76.40/78.19/76.87 % at 4.1-4.5M MACs vs vl_vit_fmnist 66.76/65.28/62.76 % at 3.8-4.3M: "
                        "reproduced (3 of 3)"),
    "vidt-neck": ("ViDT (Song et al., ICLR 2022)",
                  "ViDT with the deformable decoder neck beats ViDT without it in AP; here (benchmarks/dense_vidt.py, "
                  "fmnist-scenes detection, fashion-mnist-swin init, 200 steps x 8, 300 test scenes, seeds 0/1): AP "
                  "0.78/1.29 vs 0.02/0.03; 600 steps, seed 0: 4.54 vs 0.05: reproduced (3 of 3 runs; far from "
                  "converged)"),
    "vidt-ram": ("ViDT (Song et al., ICLR 2022)",
                 "[DET] x [PATCH] cross-attention in the last stage only is within 1 AP of every stage at lower cost; "
                 "here (benchmarks/dense_vidt.py, same runs): AP 0.78/1.29 vs 0.74/1.07 (200 steps), 4.54 vs 4.40 "
                 "(600 steps) at 76.5 vs 88.9 MMACs: reproduced (low absolute AP, so the 1-AP margin is loose)"),
    "comer": ("ViT-CoMer (Xia et al., CVPR 2024)",
              "a plain ViT + CNN pyramid + CNN<->ViT interaction beats the plain ViT with the same head, no extra "
              "pretraining (ViT-CoMer-L 62.1 mIoU ADE20K); here (benchmarks/dense_comer.py, fmnist-scenes semantic, "
              "vl_vit_fmnist stride 8 from scratch, Semantic FPN on both, 200 steps x 8, 300 test scenes, seeds "
              "0/1/2): mIoU 26.20/28.12/25.87 vs 20.64/19.26/19.28 (mean +7.00) at 574 vs 280 MMACs: reproduced "
              "(3 of 3; at 2x the MACs, far from converged)"),
    "alphavit": ("AlphaViT (Fujita, 2024)",
                 "one ViT over board cells plays several games and board sizes, beats Minimax and MCTS and approaches "
                 "AlphaZero (no number); toy-scale target: one net on Connect-4 5x4 and 6x5 >= 90 % vs random and "
                 ">= 55 % vs OpenSpiel MCTSBot-25 on both; here (benchmarks/agents_alphavit.py, 50k params, 12 "
                 "self-play iterations at 24 simulations, 160 AdamW steps per iteration, 260 CPU s at 1 thread, 100 "
                 "games per match at 200 simulations per move (the official Connect-4 count), seed 0): vs random "
                 "100 % / 99 % wins; vs MCTS-25 5x4 66 % wins (1 % losses), 6x5 83 %: reproduced (40 steps per "
                 "iteration and 48 simulations gave 50 % on 5x4)"),
    "calvin": ("CALVIN (Ishida & Henriques, CVPR 2022)",
               "constrained differentiable value iteration (learned motion kernels, action availability, rewards) "
               "plans and navigates unseen environments more robustly than VIN / GPPN (no single number); toy-scale "
               "target: exact-VI equality to 1e-5, >= 90 % success on unseen mazes and >= VIN; here "
               "(benchmarks/agents_calvin.py, 15x15 mazes, BFS expert, K=40, 400 steps, 47 CPU s, seed 0): "
               "max |V + shortest path| 0.0; success 97.5 % vs VIN 31.5 % (3.8k vs 4.0k params): reproduced"),
    "seer": ("Seer (Tian et al., 2024)",
             "foresight + inverse dynamics in one block-causal transformer beats policies without foresight (+13 % "
             "LIBERO-LONG, +21 % CALVIN); toy-scale targets: inverse dynamics given the true future >= 99 % action "
             "accuracy, Seer success >= behaviour cloning at equal steps; here (benchmarks/agents_seer.py, Reach "
             "toy with Fashion-MNIST items, 1200 steps each, 300 test scenes, 123 CPU s at 1 thread for both "
             "seeds, seeds 0/1): ID given the true future 99.4/99.3 % (action token zeroed in half the "
             "teacher-forced rows; 99.1/98.8 % without); success 99.3/99.0 % vs BC 98.0/97.7 %: reproduced (2 of 2 "
             "seeds; success by 1.3 pt)"),
    "quar-vla": ("QUAR-VLA (Ding et al., 2023)",
                 "a vision-language-action model with discretised action tokens follows instructions (4000 "
                 "evaluation trials, no single number); toy-scale target: tokenizer round trip within half a bin and "
                 "a tiny VLA on the instructed toy; here (benchmarks/agents_vla.py, 3 items, 'move the <class> to "
                 "the <corner>', 83k params, 2000 steps, 300 test scenes, seed 0): round trip within half a bin "
                 "(tests); success 72.0 % (another scene's instruction: 20.0 %), action tokens 85.4 %: reproduced "
                 "(follows the words; far from solved)"),
    "adapt": ("ADAPT (Lin et al., CVPR 2022)",
              "modality-aligned action prompts with alignment + sequential-consistency losses beat the agent "
              "without them on R2R and RxR (no single number); toy-scale target: alignment loss equals open_clip "
              "ClipLoss, the agent with vs without the losses at equal steps; here (benchmarks/agents_vla.py, "
              "instructed toy, 3 prompts, 2000 steps per arm, 174 CPU s, 300 test scenes, seed 0): equals ClipLoss "
              "(tests); success 69.3 % with the losses vs 72.7 % without (tokens 86.0 % both): not reproduced"),
    "cogact": ("CogACT (Li et al., 2024)",
               "a diffusion transformer action module conditioned on the VLM's cognition feature models multimodal "
               "actions (+35 % sim success over OpenVLA); toy-scale target: on bimodal 2-D paths the diffusion head "
               "covers both modes (MMD² < 0.1, stated before the run; each mode >= 30 %) where an MSE head averages "
               "them; here (benchmarks/agents_cogact.py, ViT + DiT 198k params, 6000 steps (2000 left the head "
               "under-trained: MMD² 0.145 on seed 0; 4000 left seed 1 at 0.167), DDIM 10 + CFG 1.5, 50 test scenes x "
               "32 samples, ~385 CPU s per seed at 1 thread, seeds 0/1/2): diffusion through the obstacle "
               "0.2/0.9/0.5 %, MMD² 0.019/0.021/0.014; MSE through 84/72/80 %, MMD² 0.94/0.89/0.92: both modes "
               "covered where MSE averages, MMD² bound met on 3 of 3: reproduced"),
    "git": ("GiT (Wang et al., ECCV 2024)",
            "one plain ViT with boxes decoded as tokens (grid-point matching, parallel teacher-forced decoding) "
            "detects on COCO (GiT-B 45.1 mAP single-task, 46.7 multi-task; official README); toy-scale target: >= 80 % "
            "of a DETR-style L1/GIoU head's AP on the same ViT; here (benchmarks/agents_git.py, reference ViT v4, "
            "5x5 grid, 128 bins, batch 8, 3000 steps with Muon, each head at its own lr chosen on val scenes (both "
            "3e-3), 200 test scenes, seeds 0/1/2, 1 thread): GiT AP 4.87/4.31/4.27 vs DETR 18.45/16.93/17.61, "
            "ratio 0.26/0.25/0.24 (mean 0.25; AP50 16.0 vs 32.0, AP75 1.2 vs 17.5: GiT's binned coordinates place "
            "boxes coarsely): not reproduced, the ranking consistent across seeds"),
    "unit": ("UNIT (Zhu et al., NeurIPS 2024)",
             "a language decoder teaches a pretrained ViT text recognition while a vision decoder distilling the "
             "frozen original encoder keeps its image performance (better OCR / DocQA, image tasks kept; no single "
             "number); toy-scale targets: >= 90 % character accuracy on held-out rendered words, Fashion-MNIST top-1 "
             "drop <= 1 pt with the vision decoder and larger without at equal steps; here "
             "(benchmarks/agents_unit.py, reference ViT v2 + CTC head, 28x84 words of 3-5 letters, 300 steps x 32, "
             "1000 test words, 171 CPU s per seed at 1 thread, seeds 0/1): char acc 94.8/95.2 % vs 95.8/96.0 % "
             "without the vision decoder; top-1 drop 0.67/0.49 pt vs 49.1/31.2 pt: reproduced (2 of 2 seeds)"),
    "adi": ("ADI (Huang et al., CVPR 2024)",
            "layer-wise identifier tokens + a gradient mask from (anchor, context-different, action-different) "
            "triples learn an action that transfers to unseen subjects better than subject-driven customisation "
            "(ActionBench; no single number); toy-scale target: ADI beats single-token inversion on 'action present' "
            "at equal 'subject kept'; here (benchmarks/agents_adi.py, diffusers UNet2DModel 690k params on 16 px "
            "Fashion-MNIST, clockwise rotation learned from 8 trouser/sneaker exemplars, 200 steps per arm, 128 "
            "samples of 8 unseen classes, seed 0, 1 thread, 270 CPU s): action / subject 43.0 / 18.8 % (ADI, "
            "beta 0.25), 50.8 / 21.9 % (beta 0.1) vs 44.5 / 24.2 % (textual inversion); layer-wise tokens without "
            "the mask 51.6 / 25.0 %: not reproduced (the mask lowers subject kept; layer-wise tokens alone +7 pt "
            "action, within 2 SE)"),
    "epalm": ("eP-ALM (Shukor et al., ICCV 2023)",
              "a frozen ViT and a frozen LM joined by one linear connector (CLS tokens of the last ViT layers into the "
              "later LM layers) and a soft prompt beat other efficient baselines on VQA / captioning with > 99 % of "
              "parameters frozen; toy-scale targets: <= 2 % trainable, item naming far above the text-only prior and "
              "within 10 pt of full fine-tuning; here (benchmarks/agents_epalm.py, reference-v2 ViT + 4-layer GPT-2 "
              "pretrained on captions, 1200 steps per arm (val-chosen), 1000 test images, seeds 0/1/2, 1 thread): "
              "0.93 % trainable; naming 79.3 / 37.7 / 35.2 % vs prior 9.6-10.5 % vs full fine-tuning 90.4 / 91.1 / "
              "91.0 %: partly reproduced (2 of 3 targets; 11-56 pt behind full fine-tuning, depending on the frozen "
              "LM each seed pretrains)"),
    "kmax": ("kMaX-DeepLab (Yu et al., ECCV 2022)",
             "k-means cross-attention (argmax assignment, sum update) beats softmax cross-attention in PQ with the "
             "decoder otherwise unchanged (COCO 58.0 PQ); small-scale target: better PQ at equal steps in >= 2 of 3 "
             "seeds; here (benchmarks/dense_kmax.py, fmnist-scenes panoptic, frozen reference-v2 ViT + simple "
             "pyramid, 1200 steps x 8 with Muon lr 1e-2, 300 test scenes, seeds 0/1/2): with kMaX-DeepLab's own "
             "loss PQ 23.35/23.54/22.24 vs 17.73/18.66/19.36: reproduced (3 of 3); with "
             "Mask2Former's loss 8.84/10.51/7.32 vs 20.42/20.68/17.09: not (0 of 3); with AdamW, 300 steps, both "
             "heads predicted the background only"),
}


SIMULATED = ("ptq", "repq", "qhyvit", "shiftadd")   # simulated in float: accuracy of the arithmetic, not its speed


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
