#!/usr/bin/env python
"""The README's main job: FlowSeg on the built-in synthetic referring benchmark, on CPU.

Steps (each skipped when its output is already there, so a rerun resumes):
  1. generate the synthetic data (refer / ReasonSeg / COCO-panoptic layouts) under
     ``$DETECTRON2_DATASETS/synthetic`` (default ``./datasets/synthetic``);
  2. write a tiny Qwen3 + SigLIP config and a tokenizer trained on the data's words;
  3. train with ``projects/FlowSeg/train_net.py`` (Detectron2 prints progress with an ETA) in
     two stages, the paper's recipe in miniature: stage 1 = the segmentor alone on the synthetic
     panoptic data (queries learn to propose every object), stage 3 = FlowSeg (LLM conditions,
     BSF, BAR) on referring + panoptic batches, starting from the stage-1 weights;
  4. evaluate the held-out split (``synthref_test``) and the reasoning split through the
     project's evaluators -> ``OUTPUT_DIR/metrics_all.json``;
  5. save overlay pictures (image, expression, predicted and true mask) to ``OUTPUT_DIR/vis``.

With ``--gres`` the synthetic expressions with several targets or none (``synthgref_*``, gRefCOCO
layout) are generated too, mixed into stage 3 (``--gres-ratio``) and evaluated: the GRES
thresholds are chosen on ``synthgref_val`` (the evaluator's sweep) and ``synthgref_test`` is
evaluated with them; the summary gets their cIoU / gIoU / N-acc / T-acc.

    python tools/main_job.py [--output-dir output/main] [--iters N] [KEY VALUE ...]
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))
TRAIN_NET = os.path.join(ROOT, "projects", "FlowSeg", "train_net.py")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[main {time.time() - T0:6.0f}s] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config-file", default=os.path.join(ROOT, "configs", "synthetic", "flowseg_synthref_cpu.yaml")
    )
    p.add_argument(
        "--stage1-config", default=os.path.join(ROOT, "configs", "synthetic", "stage1_synthpan_cpu.yaml")
    )
    p.add_argument(
        "--stage1-iters", type=int, default=None, help="stage-1 SOLVER.MAX_ITER (default: config's)"
    )
    p.add_argument(
        "--stage1-weights", default=None, help="use this stage-1 checkpoint instead of training one"
    )
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output", "main"))
    p.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER (default: the config's)")
    p.add_argument("--num-train", type=int, default=2000, help="synthetic training images")
    p.add_argument("--num-eval", type=int, default=200, help="synthetic val/test images")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--num-vis", type=int, default=12, help="overlay pictures to save")
    p.add_argument("--num-gpus", type=int, default=0, help="0: CPU (MODEL.DEVICE cpu)")
    p.add_argument("--gres", action="store_true", help="also train/evaluate the synthgref_* data")
    p.add_argument("--gres-ratio", type=float, default=2.0, help="stage-3 task ratio of synthgref_train")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config options")
    return p.parse_args()


def corpus_from_refs(dataset_names) -> list:
    """Every sentence of the synthetic data plus the prompt templates: the tokenizer's training text."""
    from detectron2.data import DatasetCatalog
    from flowseg.modeling.language.prompts import DEFAULT_ANSWERS, PROMPT_TEMPLATES

    lines = [d["expression"] for n in dataset_names for d in DatasetCatalog.get(n)]
    lines += [str(t) for t in PROMPT_TEMPLATES.values()] + [str(a) for a in DEFAULT_ANSWERS.values() if a]
    return lines


def main() -> None:
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
    from flowseg.data.synthetic.generate import default_root
    from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

    log(f"1/5 synthetic data under {default_root()}")
    sizes = {"train": args.num_train, "val": args.num_eval, "test": args.num_eval}
    generate_synthetic_datasets(default_root(), sizes, seed=args.seed)
    register_synthetic_datasets()

    gres_opts = gres_options(args, sizes) if args.gres else []
    llm_dir = os.path.join(args.output_dir, "tiny_llm")
    log(f"2/5 tiny language model config + tokenizer in {llm_dir}")
    if not os.path.isfile(os.path.join(llm_dir, "llm_config.json")):
        corpus = corpus_from_refs(
            ["synthref_train", "synthreason_train"] + (["synthgref_train"] if args.gres else [])
        )
        make_tiny_llm_dir(llm_dir, corpus=corpus * 2, vocab_size=400)
    paths = {
        "llm_config": os.path.join(llm_dir, "llm_config.json"),
        "tokenizer": os.path.join(llm_dir, "tokenizer"),
        "vision_config": os.path.join(llm_dir, "siglip_vision_config.json"),
    }
    opts = [str(o) for o in tiny_llm_cfg_overrides(paths)]
    opts += ["MODEL.LLM.LORA.ENABLED", "False", "OUTPUT_DIR", args.output_dir]
    opts += ["DATASETS.TEST", '("synthref_test", "synthreason_test")']
    opts += gres_opts
    if args.iters:
        opts += ["SOLVER.MAX_ITER", str(args.iters)]
    if args.num_gpus:
        opts += ["MODEL.DEVICE", "cuda"]
    opts += args.opts
    base = [
        sys.executable,
        TRAIN_NET,
        "--config-file",
        args.config_file,
        "--num-gpus",
        str(max(args.num_gpus, 1)),
    ]

    stage1_dir = os.path.join(args.output_dir, "stage1")
    stage1 = args.stage1_weights or os.path.join(stage1_dir, "model_final.pth")
    if args.stage1_weights and not os.path.isfile(stage1):
        raise FileNotFoundError(f"--stage1-weights: no such checkpoint: {stage1}")
    if not os.path.isfile(stage1):
        log("3a/5 stage 1: segmentor on synthetic panoptic data (resumes if interrupted)")
        s1 = [
            sys.executable,
            TRAIN_NET,
            "--config-file",
            args.stage1_config,
            "--resume",
            "OUTPUT_DIR",
            stage1_dir,
        ]
        s1 += ["DATASETS.TEST", "()"] + (
            ["SOLVER.MAX_ITER", str(args.stage1_iters)] if args.stage1_iters else []
        )
        subprocess.run(s1 + (["MODEL.DEVICE", "cuda"] if args.num_gpus else []), check=True, cwd=ROOT)
    final = os.path.join(args.output_dir, "model_final.pth")
    if not os.path.isfile(final):
        log("3b/5 stage 3: FlowSeg on referring + panoptic batches (resumes if interrupted)")
        # Detectron2's EvalHook evaluates DATASETS.TEST after the last iteration and the trainer
        # writes metrics_all.json: that is step 4, no second evaluation needed
        subprocess.run(base + ["--resume", "MODEL.WEIGHTS", stage1] + opts, check=True, cwd=ROOT)
        log("4/5 held-out evaluation: done at the end of training")
    else:
        log(f"3/5 training done already ({final})")
        log("4/5 evaluation on the held-out split")
        subprocess.run(base + ["--eval-only", "MODEL.WEIGHTS", final] + opts, check=True, cwd=ROOT)
    with open(os.path.join(args.output_dir, "metrics_all.json")) as f:
        metrics = json.load(f)["metrics"]

    vis_dir = os.path.join(args.output_dir, "vis")
    if args.num_vis > 0:
        log("5/5 overlay pictures")
        save_overlays(args.config_file, opts, final, "synthref_test", vis_dir, args.num_vis)

    ref = metrics["synthref_test"]["referring"]
    rea = metrics["synthreason_test"]["reasoning"]
    summary = {
        "held_out_cIoU": ref["cIoU"],
        "held_out_gIoU": ref["gIoU"],
        "oracle_cIoU": ref.get("oracle_cIoU"),
        "reasoning_gIoU": rea["gIoU"],
        "reasoning_cIoU": rea["cIoU"],
        "minutes": round((time.time() - T0) / 60, 1),
    }
    if args.gres:
        summary["gres"] = gres_test(base, opts, final, args.output_dir, metrics)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"done: {json.dumps(summary)}")
    log(f"metrics: {args.output_dir}/metrics_all.json, pictures: {vis_dir}")


def gres_options(args: argparse.Namespace, sizes: dict) -> list:
    """Config options that add the synthetic GRES data to stage 3 and to the evaluation."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config
    from flowseg.data.synthetic import generate_synthgref_datasets, register_synthgref_datasets
    from flowseg.data.synthetic.generate import default_root

    log("1b/5 synthetic GRES expressions (synthgref_*)")
    generate_synthgref_datasets(default_root(), sizes, seed=args.seed)
    register_synthgref_datasets()
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    train = [*cfg.DATASETS.TRAIN, "synthgref_train"]
    ratios = [*cfg.DATALOADER.TASK_RATIOS, args.gres_ratio]
    test = '("synthref_test", "synthreason_test", "synthgref_val", "synthgref_test")'
    opts = ["DATASETS.TRAIN", str(tuple(train)), "DATALOADER.TASK_RATIOS", str(ratios), "DATASETS.TEST", test]
    if "RETURN_CANDIDATES" in cfg.TEST:  # the threshold sweep needs every query's mask
        opts += ["TEST.RETURN_CANDIDATES", "True"]
    return opts


def gres_test(base: list, opts: list, weights: str, output_dir: str, metrics: dict) -> dict:
    """Evaluate synthgref_test with the thresholds that the sweep chose on synthgref_val."""
    val = metrics["synthgref_val"]["gres"]
    chosen = {
        "MODEL.FLOWSEG.GRES.SCORE_THRESHOLD": val["sweep_score_threshold"],
        "MODEL.FLOWSEG.GRES.NO_TARGET_THRESHOLD": val["sweep_no_target_threshold"],
    }
    log(f"GRES thresholds chosen on synthgref_val: {chosen}")
    out = os.path.join(output_dir, "gres_test")
    extra = ["DATASETS.TEST", '("synthgref_test",)', "OUTPUT_DIR", out]
    extra += [str(v) for kv in chosen.items() for v in kv]
    subprocess.run(base + ["--eval-only", "MODEL.WEIGHTS", weights] + opts + extra, check=True, cwd=ROOT)
    with open(os.path.join(out, "metrics_all.json")) as f:
        test = json.load(f)["metrics"]["synthgref_test"]["gres"]
    keys = ("cIoU", "gIoU", "N-acc", "T-acc", "cIoU_single", "cIoU_multi")
    return {
        "thresholds": chosen,
        "val": {k: val[f"sweep_{k}"] for k in keys[:4]},
        "test": {k: test[k] for k in keys},
    }


def save_overlays(config_file: str, opts: list, weights: str, dataset: str, out_dir: str, n: int) -> None:
    import cv2
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model
    from flowseg import add_flowseg_config
    from flowseg.checkpoint import FlowSegCheckpointer
    from flowseg.data.build import build_test_mapper
    from flowseg.evaluation.metrics import intersection_union, iou_from_iu
    from flowseg.utils.visualize import draw_referring_overlay

    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    model = build_model(cfg).eval()
    FlowSegCheckpointer(model, cfg=cfg).load(weights)  # trainable-only checkpoints too
    mapper = build_test_mapper(cfg, dataset)
    os.makedirs(out_dir, exist_ok=True)
    for i, d in enumerate(DatasetCatalog.get(dataset)[:n]):
        x = mapper(dict(d))
        with torch.no_grad():
            ref = model([x])[0]["ref_seg"]
        pred = ref["mask"].cpu().numpy()
        iou = iou_from_iu(*intersection_union(pred, x["gt_mask"]))
        image = cv2.cvtColor(cv2.imread(d["file_name"]), cv2.COLOR_BGR2RGB)
        pic = draw_referring_overlay(image, d["expression"], pred, x["gt_mask"], ref["score"], iou, scale=3.0)
        cv2.imwrite(os.path.join(out_dir, f"{i:03d}.png"), cv2.cvtColor(pic, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
