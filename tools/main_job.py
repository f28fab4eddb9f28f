#!/usr/bin/env python
"""The README's main job: FlowSeg's three-stage recipe in miniature, on CPU, on the built-in
synthetic referring benchmark or on any data set in the supported layouts.

Steps (each skipped when its output is already there, so a rerun resumes):
  1. generate the synthetic data (refer / ReasonSeg / COCO-panoptic layouts) under
     ``$DETECTRON2_DATASETS/synthetic`` when the ``synth*`` sets are used (the default);
  2. write LLaVA-format conversations about the referring training scenes
     (``flowseg.data.writers.scene_conversations``), registered as ``<refer-train>_conversations``;
  3. write a tiny Qwen3 + SigLIP config and a tokenizer trained on the data's words;
  4. train with ``projects/FlowSeg/train_net.py`` (Detectron2 prints progress with an ETA; on the
     CPU in ``--cpu-processes`` data-parallel processes):
     stage 1 = the segmentor alone on the panoptic data (queries learn to propose every object),
     stage 2 = the language model, vision tower and phi_vis on the conversations (LM loss: the
     stand-in for a pretrained LLM), stage 3 = FlowSeg (LLM conditions, BSF, BAR) on referring +
     panoptic batches, each stage starting from the previous one's weights;
  5. evaluate the held-out referring set and the reasoning set through the project's evaluators
     -> ``OUTPUT_DIR/metrics_all.json``;
  6. save overlay pictures (image, expression, predicted and true mask; one expression of each
     of several images) to ``OUTPUT_DIR/vis``.

The job's own progress lines, with the overall training ETA, are also saved in
``OUTPUT_DIR/main_job.log``; each stage's folder gets Detectron2's ``log.txt`` and ``loss_curve.png``.

Other data: name registered sets (``--refer-train refcoco_unc_train --refer-test refcoco_unc_val
refcoco_unc_testA refcoco_unc_testB --panoptic-train coco_2017_train_panoptic_with_sem_seg``) under
``--data-root`` (the ``$DETECTRON2_DATASETS`` layout of ``datasets/README.md``; the panoptic
json's own categories); nothing is generated then. Every ``--refer-test`` set is a row of the
summary table (``OUTPUT_DIR/summary.md``).

With ``--gres`` the synthetic expressions with several targets or none (``synthgref_*``, gRefCOCO
layout) are generated too, mixed into stage 3 (``--gres-ratio``) and evaluated: the GRES
thresholds are chosen on ``synthgref_val`` (the evaluator's sweep) and ``synthgref_test`` is
evaluated with them; the summary gets their cIoU / gIoU / N-acc / T-acc.

    python tools/main_job.py [--output-dir output/main] [--iters N] [KEY VALUE ...]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))
TRAIN_NET = os.path.join(ROOT, "projects", "FlowSeg", "train_net.py")
T0 = time.time()
PROGRESS = None  # the job's JobProgress, made on first use


def progress():
    """The job's :class:`flowseg.utils.progress.JobProgress`. Imported on first use, not at the
    top: importing flowseg registers the builtin data sets under ``$DETECTRON2_DATASETS``, which
    ``main`` sets from ``--data-root`` first."""
    global PROGRESS
    if PROGRESS is None:
        from flowseg.utils.progress import JobProgress

        PROGRESS = JobProgress({}, t0=T0)
    return PROGRESS


def log(msg: str) -> None:
    """A progress line on the console and, once the job has started, in ``main_job.log``."""
    progress().log(msg)


def stage_plan(args: argparse.Namespace) -> dict:
    """Training iterations of each stage that will run, for the overall ETA."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config

    def iters(config_file: str, override: Optional[int]) -> int:
        if override:
            return override
        cfg = add_flowseg_config(get_cfg())
        cfg.merge_from_file(config_file)
        return cfg.SOLVER.MAX_ITER

    plan = {}
    if not args.pretrained_run:
        plan["stage1"] = iters(args.stage1_config, args.stage1_iters)
        if args.stage2_iters != 0:
            plan["stage2"] = iters(args.stage2_config, args.stage2_iters)
    opts = dict(zip(args.opts[::2], args.opts[1::2]))
    plan["stage3"] = iters(args.config_file, args.iters or int(opts.get("SOLVER.MAX_ITER", 0)))
    return plan


def start_progress(args: argparse.Namespace) -> None:
    """Save the job's progress lines in ``OUTPUT_DIR/main_job.log`` and plan the overall ETA."""
    job = progress()
    job.log_file = os.path.join(args.output_dir, "main_job.log")
    job.plan = {k: v for k, v in stage_plan(args).items() if v > 0}
    log(f"start: {' '.join(sys.argv)}")
    log(f"training iterations per stage: {job.plan} (progress log: {job.log_file})")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg_dir = os.path.join(ROOT, "configs", "synthetic")
    p.add_argument("--config-file", default=os.path.join(cfg_dir, "flowseg_synthref_cpu.yaml"))
    p.add_argument("--stage1-config", default=os.path.join(cfg_dir, "stage1_synthpan_cpu.yaml"))
    p.add_argument("--stage2-config", default=os.path.join(cfg_dir, "stage2_synthconv_cpu.yaml"))
    p.add_argument(
        "--stage1-iters", type=int, default=None, help="stage-1 SOLVER.MAX_ITER (default: config's)"
    )
    p.add_argument("--stage2-iters", type=int, default=None, help="stage-2 SOLVER.MAX_ITER; 0 skips stage 2")
    p.add_argument(
        "--pretrained-run",
        default=None,
        help="a finished main-job output: stage 3 starts from its stage-2 (or stage-1) weights and tiny_llm",
    )
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output", "main"))
    p.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER (default: the config's)")
    data = p.add_argument_group("data (registered names; other than synth*: nothing is generated)")
    data.add_argument("--data-root", default=None, help="$DETECTRON2_DATASETS (default: it, else ./datasets)")
    data.add_argument("--refer-train", default="synthref_train", help="referring training set")
    data.add_argument(
        "--refer-test",
        nargs="+",
        default=["synthref_test"],
        help="referring held-out set(s), e.g. refcoco_unc_val refcoco_unc_testA refcoco_unc_testB; "
        "each is a row of the summary table",
    )
    data.add_argument(
        "--reason-test",
        default=None,
        help="ReasonSeg-style set ('': none; default: synthreason_test with synthref)",
    )
    data.add_argument("--panoptic-train", default="synthpan_train", help="COCO-panoptic-style set")
    p.add_argument("--num-train", type=int, default=2000, help="synthetic training images")
    p.add_argument("--num-eval", type=int, default=200, help="synthetic val/test images")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--num-vis", type=int, default=12, help="overlay pictures to save")
    p.add_argument("--num-gpus", type=int, default=0, help="0: CPU (MODEL.DEVICE cpu)")
    p.add_argument(
        "--cpu-processes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="CPU runs: data-parallel training processes (gloo), each with cores / N threads",
    )
    p.add_argument("--gres", action="store_true", help="also train/evaluate the synthgref_* data")
    p.add_argument("--gres-ratio", type=float, default=2.0, help="stage-3 task ratio of synthgref_train")
    p.add_argument(
        "--set",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a config option for every stage (e.g. MODEL.SAM_VIT.CONV_STEM False); repeatable",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config options of stage 3")
    args = p.parse_args(argv)
    split_refer_test(args, p)
    return args


# A config key (``SOLVER.BASE_LR``, ``SEED``): data set names have lower-case letters.
_CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*")


def split_refer_test(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--refer-test`` takes names up to the first config KEY: ``--refer-test a b SOLVER.X 1``
    gives the sets ``a b`` and stage 3 the option ``SOLVER.X 1`` (as it did with one name)."""
    for i, name in enumerate(args.refer_test):
        if _CONFIG_KEY.fullmatch(name):
            args.opts = args.refer_test[i:] + args.opts
            args.refer_test = args.refer_test[:i]
            break
    if not args.refer_test:
        parser.error("--refer-test needs at least one registered data set name before any KEY VALUE option")


def corpus(args: argparse.Namespace, conversations_json: str) -> list:
    """The tokenizer's training text: every expression / query, the panoptic class names, the
    stage-2 conversations and the prompt templates."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from flowseg.modeling.language.prompts import DEFAULT_ANSWERS, PROMPT_TEMPLATES

    names = [args.refer_train] + (["synthgref_train"] if args.gres else [])
    if args.reason_test.endswith("_test"):  # its training split, never a held-out set's words
        names.append(args.reason_test[: -len("_test")] + "_train")
    lines = [d["expression"] for n in names if n in DatasetCatalog.list() for d in DatasetCatalog.get(n)]
    lines += list(MetadataCatalog.get(args.panoptic_train).get("stuff_classes", []))
    if conversations_json:
        with open(conversations_json) as f:
            lines += [t["value"].replace("<image>", "") for s in json.load(f) for t in s["conversations"]]
    lines += [str(t) for t in PROMPT_TEMPLATES.values()] + [str(a) for a in DEFAULT_ANSWERS.values() if a]
    return lines


def train(cmd: list, output_dir: str, what: str, stage: str = "stage3") -> str:
    """Run one training stage (resumes if interrupted), logging its progress and the overall ETA;
    return its final checkpoint."""
    final = os.path.join(output_dir, "model_final.pth")
    if os.path.isfile(final):
        log(f"{what}: done already ({final})")
        progress().finish(stage)
    else:
        log(f"{what} (resumes if interrupted); {progress().eta_text()}")
        # train_net's flags go before the KEY VALUE options (argparse REMAINDER)
        full = cmd[:2] + ["--resume"] + cmd[2:] + ["OUTPUT_DIR", output_dir]
        progress().run_stage(full, stage, output_dir, cwd=ROOT)
    return final


def prepare_data(args: argparse.Namespace) -> list:
    """Generate the built-in data when it is used; return the GRES options (``--gres``)."""
    from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
    from flowseg.data.synthetic.generate import default_root

    sizes = {"train": args.num_train, "val": args.num_eval, "test": args.num_eval}
    if any(n.startswith("synth") for n in (args.refer_train, *args.refer_test, args.panoptic_train)):
        log(f"1/6 synthetic data under {default_root()}")
        generate_synthetic_datasets(default_root(), sizes, seed=args.seed)
        register_synthetic_datasets()
    return gres_options(args, sizes) if args.gres else []


def check_registered(args: argparse.Namespace) -> None:
    """Stop before any training when a data set name is not registered (e.g. a typo in a split)."""
    import flowseg  # noqa: F401  (registers the builtin names under $DETECTRON2_DATASETS)
    from detectron2.data import DatasetCatalog

    names = [args.refer_train, *args.refer_test, args.panoptic_train]
    names += [args.reason_test] if args.reason_test else []
    missing = [n for n in names if n not in DatasetCatalog.list()]
    if missing:
        raise SystemExit(
            f"error: {missing} are not registered data sets (under --data-root "
            f"{os.environ['DETECTRON2_DATASETS']}: the names of datasets/README.md)"
        )


def language_options(llm_dir: str, corpus_fn) -> list:
    """Tiny Qwen3 + SigLIP configs and a tokenizer trained on ``corpus_fn()`` (written to
    ``llm_dir`` unless it is there already), as config options."""
    from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

    log(f"3/6 tiny language model config + tokenizer in {llm_dir}")
    if not os.path.isfile(os.path.join(llm_dir, "llm_config.json")):
        make_tiny_llm_dir(llm_dir, corpus=corpus_fn() * 2, vocab_size=400)
    paths = {
        "llm_config": os.path.join(llm_dir, "llm_config.json"),
        "tokenizer": os.path.join(llm_dir, "tokenizer"),
        "vision_config": os.path.join(llm_dir, "siglip_vision_config.json"),
    }
    return [str(o) for o in tiny_llm_cfg_overrides(paths)] + ["MODEL.LLM.LORA.ENABLED", "False"]


def pretrained(run_dir: str) -> tuple:
    """(stage-2 or else stage-1 checkpoint, tiny_llm folder) of a finished main-job output."""
    for stage in ("stage2", "stage1"):
        weights = os.path.join(run_dir, stage, "model_final.pth")
        if os.path.isfile(weights):
            llm_dir = os.path.join(run_dir, "tiny_llm")
            if not os.path.isfile(os.path.join(llm_dir, "llm_config.json")):
                raise FileNotFoundError(f"--pretrained-run: {run_dir} has {stage} weights but no tiny_llm/")
            return weights, llm_dir
    raise FileNotFoundError(f"--pretrained-run: no stage1/ or stage2/ model_final.pth under {run_dir}")


def pretrain(args: argparse.Namespace, train_net: list, common: list) -> tuple:
    """Stages 1 and 2 (each skipped when done), with ``common`` (options of every stage) added;
    returns (weights for stage 3, language options)."""
    from flowseg.data.writers.scene_conversations import write_scene_conversations

    if args.pretrained_run:
        weights, llm_dir = pretrained(args.pretrained_run)
        log(f"2/6 stages 1-2 of {args.pretrained_run}: {weights}")
        return weights, language_options(llm_dir, None)
    conv_json = ""
    if args.stage2_iters != 0:
        log(f"2/6 stage-2 conversations about the scenes of {args.refer_train}")
        conv_json = write_scene_conversations(args.refer_train, os.environ["DETECTRON2_DATASETS"])
    lang = language_options(os.path.join(args.output_dir, "tiny_llm"), lambda: corpus(args, conv_json))
    num_classes = stage1_classes(args.panoptic_train)
    s1 = train_net + [
        args.stage1_config,
        "DATASETS.TEST",
        "()",
        "DATASETS.TRAIN",
        f"('{args.panoptic_train}',)",
    ]
    s1 += ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(num_classes)] + common
    s1 += ["SOLVER.MAX_ITER", str(args.stage1_iters)] if args.stage1_iters else []
    weights = train(
        s1, os.path.join(args.output_dir, "stage1"), "4a/6 stage 1: segmentor on panoptic data", "stage1"
    )
    if conv_json:
        s2 = train_net + [args.stage2_config, "MODEL.WEIGHTS", weights] + lang + common
        s2 += ["DATASETS.TRAIN", f"('{args.refer_train}_conversations',)"]
        s2 += ["SOLVER.MAX_ITER", str(args.stage2_iters)] if args.stage2_iters else []
        weights = train(
            s2, os.path.join(args.output_dir, "stage2"), "4b/6 stage 2: language on conversations", "stage2"
        )
    return weights, lang


def stage1_classes(panoptic_train: str) -> int:
    """Stage 1's class count: the panoptic set's categories, said with where they come from."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(panoptic_train)
    classes = meta.get("stuff_classes", None)
    if not classes:
        raise ValueError(f"--panoptic-train {panoptic_train}: not a registered COCO-panoptic data set")
    source = meta.get("categories_source", None) or "its metadata"
    log(f"stage 1 classes: {len(classes)} categories of {panoptic_train}, from {source}")
    return len(classes)


def launcher(args: argparse.Namespace) -> tuple:
    """``(train_net command up to --config-file, options of every stage)``. On the CPU, training
    runs in ``--cpu-processes`` data-parallel processes (gloo) of cores / N threads each: PyTorch's
    default (every core in each process) makes processes that share the cores spin against each
    other, and on 2 cores two 1-thread processes ran 1.0-1.3x as fast as one 2-thread process
    (``tools/bench_cpu_processes.py``). Sets ``OMP_NUM_THREADS`` unless the caller did."""
    processes = max(args.num_gpus or args.cpu_processes, 1)
    if not args.num_gpus:
        os.environ.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // processes, 1)))
    common = (["MODEL.DEVICE", "cuda"] if args.num_gpus else []) + [x for kv in args.set for x in kv]
    return [sys.executable, TRAIN_NET, "--num-gpus", str(processes), "--config-file"], common


def main() -> None:
    args = parse_args()
    if args.reason_test is None:
        args.reason_test = "synthreason_test" if args.refer_train.startswith("synthref") else ""
    os.makedirs(args.output_dir, exist_ok=True)
    os.environ["DETECTRON2_DATASETS"] = args.data_root or os.environ.get(
        "DETECTRON2_DATASETS", os.path.join(ROOT, "datasets")
    )
    start_progress(args)
    train_net, common = launcher(args)
    gres_opts = prepare_data(args)
    check_registered(args)
    weights, lang = pretrain(args, train_net, common)

    tests = list(args.refer_test) + ([args.reason_test] if args.reason_test else [])
    opts = lang + ["DATASETS.TEST", str(tuple(tests))] + common
    opts += ["DATASETS.TRAIN", f"('{args.refer_train}', '{args.panoptic_train}')"]
    opts += gres_opts + (["SOLVER.MAX_ITER", str(args.iters)] if args.iters else []) + args.opts
    base = train_net + [args.config_file]
    # Detectron2's EvalHook evaluates DATASETS.TEST after the last iteration and the trainer
    # writes metrics_all.json: the held-out evaluation needs no second pass
    final = train(base + ["MODEL.WEIGHTS", weights] + opts, args.output_dir, "4c/6 stage 3: FlowSeg")
    if not os.path.isfile(os.path.join(args.output_dir, "metrics_all.json")):
        log("5/6 evaluation on the held-out split")
        subprocess.run(base + ["--eval-only", "MODEL.WEIGHTS", final] + opts, check=True, cwd=ROOT)
    report(args, base, opts, final)


def report(args: argparse.Namespace, base: list, opts: list, final: str) -> None:
    """Overlay pictures, ``summary.json`` (held-out, oracle, reasoning, GRES, minutes) and the
    table of every held-out set (``summary.md``, printed too)."""
    with open(os.path.join(args.output_dir, "metrics_all.json")) as f:
        metrics = json.load(f)["metrics"]
    vis_dir = os.path.join(args.output_dir, "vis")
    if args.num_vis > 0:
        log("6/6 overlay pictures")
        save_overlays(args.config_file, opts, final, args.refer_test[0], vis_dir, args.num_vis)
    summary = held_out_summary(metrics, args.refer_test, args.reason_test)
    summary["minutes"] = round((time.time() - T0) / 60, 1)
    if args.gres:
        summary["gres"] = gres_test(base, opts, final, args.output_dir, metrics)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = summary_table(summary)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    log(f"done in {summary['minutes']} min:\n{table}")
    log(f"metrics: {args.output_dir}/metrics_all.json, pictures: {vis_dir}")


def held_out_summary(metrics: dict, refer_tests: List[str], reason_test: str) -> dict:
    """``summary.json``'s figures: ``held_out`` maps each referring set to its cIoU / gIoU /
    oracle cIoU; the ``held_out_*`` keys repeat the first set's (older summaries have only them)."""
    held_out = {}
    for name in refer_tests:
        ref = metrics[name]["referring"]
        held_out[name] = {"cIoU": ref["cIoU"], "gIoU": ref["gIoU"], "oracle_cIoU": ref.get("oracle_cIoU")}
    first = held_out[refer_tests[0]]
    summary = {
        "held_out_cIoU": first["cIoU"],
        "held_out_gIoU": first["gIoU"],
        "oracle_cIoU": first["oracle_cIoU"],
        "held_out": held_out,
    }
    if reason_test:
        rea = metrics[reason_test]["reasoning"]
        summary.update(reasoning_gIoU=rea["gIoU"], reasoning_cIoU=rea["cIoU"], reasoning_test=reason_test)
    return summary


def summary_table(summary: dict) -> str:
    """One markdown table: a row per held-out referring set (and the reasoning set)."""

    def cell(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows = ["| data set | cIoU | gIoU | oracle cIoU |", "|---|---:|---:|---:|"]
    for name, m in summary["held_out"].items():
        rows.append(f"| {name} | {cell(m['cIoU'])} | {cell(m['gIoU'])} | {cell(m['oracle_cIoU'])} |")
    if "reasoning_test" in summary:
        name = f"{summary['reasoning_test']} (reasoning)"
        rows.append(f"| {name} | {cell(summary['reasoning_cIoU'])} | {cell(summary['reasoning_gIoU'])} | - |")
    return "\n".join(rows)


def gres_options(args: argparse.Namespace, sizes: dict) -> list:
    """Config options that add the synthetic GRES data to stage 3 and to the evaluation."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config
    from flowseg.data.synthetic import generate_synthgref_datasets, register_synthgref_datasets
    from flowseg.data.synthetic.generate import default_root

    log("1b/6 synthetic GRES expressions (synthgref_*)")
    generate_synthgref_datasets(default_root(), sizes, seed=args.seed)
    register_synthgref_datasets()
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    sets = (args.refer_train, args.panoptic_train, "synthgref_train")
    ratios = [*cfg.DATALOADER.TASK_RATIOS, args.gres_ratio]
    tests = tuple(n for n in (*args.refer_test, args.reason_test, "synthgref_val", "synthgref_test") if n)
    opts = ["DATASETS.TRAIN", str(sets), "DATALOADER.TASK_RATIOS", str(ratios), "DATASETS.TEST", str(tests)]
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


def overlay_samples(dicts: list, n: int) -> list:
    """``n`` samples from as many images as possible: one expression of each image in data-set
    order, then a second of each, ... (consecutive samples often share an image)."""
    by_image: dict = {}
    for d in dicts:
        by_image.setdefault(d["file_name"], []).append(d)
    rounds = max((len(v) for v in by_image.values()), default=0)
    picked = [v[r] for r in range(rounds) for v in by_image.values() if r < len(v)]
    return picked[:n]


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
    for i, d in enumerate(overlay_samples(DatasetCatalog.get(dataset), n)):
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
