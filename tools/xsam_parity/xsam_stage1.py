"""Stage-1 (segmentor-only) X-SAM fixture: X-SAM's COCO-panoptic evaluation path on a tiny
synthetic COCO-panoptic folder (images, panoptic PNGs, panoptic JSON), run with X-SAM's
``ImgGenSegDataset`` (data_mode="eval", expand2square=True as in X-SAM's s1 config),
``xsam_collate_fn``, ``XSamModel`` in ``mode="tensor"`` and its panoptic post-processing."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from xsam_tiny import (
    SAM_HIDDEN,
    SEED,
    half_state_dict,
    model_configs,
    perturb_weights,
    round_weights_to_half,
    sam_processor,
    tiny_segmentor,
    train_briefly,
)

# (id, name, isthing): three "things" and two "stuff" classes, non-contiguous ids as in COCO
CATEGORIES = [
    (1, "person", 1),
    (3, "car", 1),
    (18, "dog", 1),
    (149, "grass-merged", 0),
    (187, "sky-other-merged", 0),
]
# (height, width) of each synthetic image; all non-square
IMAGE_SIZES = [(40, 56), (48, 36), (30, 60)]
TRAIN_STEPS = 60
TRAIN_LR = 3e-3


def synthetic_panoptic(root: Path) -> tuple[Path, dict]:
    """Write images, panoptic PNGs and a panoptic JSON in COCO's layout; return the JSON path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED)
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    images, annotations = [], []
    colors = {
        1: (220, 60, 60),
        3: (60, 60, 220),
        18: (200, 160, 40),
        149: (40, 160, 60),
        187: (120, 180, 230),
    }
    for image_id, (height, width) in enumerate(IMAGE_SIZES, start=1):
        ids = np.zeros((height, width), dtype=np.int64)
        rgb = np.zeros((height, width, 3), dtype=np.uint8)
        segments = []
        # stuff: sky on top, grass below
        split = height // 2 + int(rng.integers(-3, 4))
        layout = [(187, (0, 0, split, width)), (149, (split, 0, height, width))]
        # two things at random places
        for cat in rng.choice([1, 3, 18], size=2, replace=False):
            h, w = int(rng.integers(8, height // 2)), int(rng.integers(8, width // 2))
            y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            layout.append((int(cat), (y, x, y + h, x + w)))
        for index, (cat, (y0, x0, y1, x1)) in enumerate(layout, start=1):
            segment_id = cat * 1000 + index
            ids[y0:y1, x0:x1] = segment_id
            rgb[y0:y1, x0:x1] = colors[cat]
        for index, (cat, _) in enumerate(layout, start=1):
            segment_id = cat * 1000 + index
            ys, xs = np.nonzero(ids == segment_id)
            if len(ys) == 0:
                continue
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            segments.append(
                {"id": segment_id, "category_id": cat, "area": int(len(ys)), "bbox": bbox, "iscrowd": 0}
            )
        noise = rng.integers(-25, 26, size=rgb.shape)
        image = np.clip(rgb.astype(np.int64) + noise, 0, 255).astype(np.uint8)
        file_name = f"{image_id:012d}.jpg"
        # COCO's file name, lossless content: PIL reads the PNG whatever the suffix says
        Image.fromarray(image).save(root / "images" / file_name, format="PNG")
        pan = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(pan).save(root / "panoptic" / file_name.replace(".jpg", ".png"))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations.append(
            {"image_id": image_id, "file_name": file_name.replace(".jpg", ".png"), "segments_info": segments}
        )
    categories = [
        {"id": cid, "name": name, "isthing": isthing, "supercategory": name, "color": list(colors[cid])}
        for cid, name, isthing in CATEGORIES
    ]
    data = {"images": images, "annotations": annotations, "categories": categories}
    path = root / "panoptic_val.json"
    path.write_text(json.dumps(data))
    return path, data


def build_stage1_model():
    """X-SAM's s1_train config's XSamModel arguments at tiny sizes (linear class head)."""
    from xsam.dataset.process_fns import img_genseg_postprocess_fn
    from xsam.model import XSamModel

    model = XSamModel(
        freeze_mask_encoder=False,
        use_activation_checkpointing=False,
        postprocess_fn=img_genseg_postprocess_fn,
        connector_type="conv",
        extra_select_layers=[6, 12, 18, 24],
        connector_hidden_dim=SAM_HIDDEN,
        connector_scale_factor=[4, 2, 1, 0.5],
        segmentor=tiny_segmentor("linear", num_labels=len(CATEGORIES)),
    )
    return model


def recording_postprocess(postprocess_fn):
    """Wrap X-SAM's post-processing so the class logits it receives are kept (mask logits are
    kept at the decoder's 1/8 resolution by a hook: X-SAM only upsamples them bilinearly)."""
    captured: dict = {}

    def record(outputs, **kwargs):
        captured["class_queries_logits"] = outputs.class_queries_logits.detach().clone()
        return postprocess_fn(outputs, **kwargs)

    return captured, record


def xsam_panoptic_quality(dataset, image_infos: list, results: list) -> dict:
    """X-SAM's own COCO-panoptic evaluator (ImgGenSegEvaluator -> its pq_compute) on the
    predictions; the dict pq_compute returns is kept."""
    import copy

    import xsam.evaluation.evaluators.img_genseg_evaluator as genseg_eval

    captured = {}
    original = genseg_eval.pq_compute

    def recording_pq_compute(*args, **kwargs):
        captured["pq"] = original(*args, **kwargs)
        return captured["pq"]

    genseg_eval.pq_compute = recording_pq_compute
    try:
        evaluator = genseg_eval.ImgGenSegEvaluator(data_name=dataset.data_name, distributed=False)
        evaluator.metadata = dataset.metadata
        evaluator.reset()
        for infos, result in zip(image_infos, results):
            evaluator.process(infos, [copy.deepcopy(result)])
        evaluator.evaluate()
    finally:
        genseg_eval.pq_compute = original
    # plain floats, so that the fixture loads with torch.load(weights_only=True)
    return json.loads(json.dumps(captured["pq"], default=float))


def infer_all(model, dataset) -> tuple[list, list, list]:
    """X-SAM's panoptic evaluation call on every image (batch size 1, as X-SAM evaluates)."""
    import torch
    from xsam.dataset.collate_fns import xsam_collate_fn

    per_image, image_infos, results_all = [], [], []
    for index in range(len(dataset)):
        item = dataset[index]
        batch = model.data_preprocessor(xsam_collate_fn([item]), False)
        sam_input = batch["data_dict"]["extra_pixel_values"][0].clone()  # the forward pops it
        image_infos.append(batch["data_samples"].metainfo["image_infos"])
        captured, model.postprocess_fn = recording_postprocess(dataset.postprocess_fn)
        hook = model.segmentor.decoder.register_forward_hook(
            lambda module, args, output, store=captured: store.update(
                mask_logits_lowres=output.masks_queries_logits[-1].detach().clone()
            )
        )
        with torch.no_grad():
            _, results = model(**batch, mode="tensor", metadata=dataset.metadata, do_postprocess=True)
        hook.remove()
        result = results[0]
        results_all.append(result)
        per_image.append(
            {
                "image_id": item["image_info"]["image_id"],
                "image_size": list(item["image_size"]),
                "scaled_size": list(item["scaled_size"]),
                "extra_pixel_values": sam_input,
                **captured,
                "segmentation": result["segmentation"].clone(),
                "segments_info": [dict(x) for x in result["segments_info"]],
            }
        )
    return per_image, image_infos, results_all


def tiny_panoptic_dataset(json_path: Path, root: Path):
    """X-SAM's COCO-panoptic evaluation dataset (s1 config's arguments) on the synthetic folder."""
    from xsam.dataset import ImgGenSegDataset
    from xsam.dataset.process_fns import img_genseg_postprocess_fn, process_map_fn_factory

    return ImgGenSegDataset(
        data_path=str(json_path),
        image_folder=str(root / "images"),
        pan_segmap_folder=str(root / "panoptic"),
        task_name="img_genseg",
        data_name="img_genseg_tiny_panoptic_val",
        data_mode="eval",
        postprocess_fn=dict(
            type=process_map_fn_factory, fn=img_genseg_postprocess_fn, task_name="panoptic_genseg"
        ),
        extra_image_processor=sam_processor(),
        expand2square=True,
        use_binary_cls=False,
    )


def category_map(result: dict):
    """Per-pixel contiguous category of a panoptic result (-1 where no segment)."""
    import torch

    out = torch.full_like(result["segmentation"], -1)
    for segment in result["segments_info"]:
        out[result["segmentation"] == segment["id"]] = segment["category_id"]
    return out


def run_stage1(out_dir: Path) -> dict:
    import numpy as np
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    root = Path(tempfile.mkdtemp(prefix="xsam_stage1_"))
    json_path, coco_data = synthetic_panoptic(root)
    model = build_stage1_model()
    dataset = tiny_panoptic_dataset(json_path, root)
    items = [lambda index=index: dataset[index] for index in range(len(dataset))]
    losses = train_briefly(model, items, TRAIN_STEPS, TRAIN_LR)
    round_weights_to_half(model)
    per_image, image_infos, results_all = infer_all(model, dataset)
    pq = xsam_panoptic_quality(dataset, image_infos, results_all)
    state_dict = half_state_dict(model)
    configs = model_configs(model)
    perturb_weights(model, 1e-6, SEED)
    probe = infer_all(model, dataset)[0]
    sensitivity = {
        "class_queries_logits": max(
            float((a["class_queries_logits"] - b["class_queries_logits"]).abs().max())
            for a, b in zip(probe, per_image)
        ),
        "mask_logits_lowres": max(
            float((a["mask_logits_lowres"] - b["mask_logits_lowres"]).abs().max())
            for a, b in zip(probe, per_image)
        ),
        # segment ids are colours from X-SAM's IdGenerator, whose generator state carries over
        # between runs: compare the category of every pixel instead
        "category_changed_pixels": sum(
            int((category_map(a) != category_map(b)).sum()) for a, b in zip(probe, per_image)
        ),
    }
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    metadata = dataset.metadata
    return {
        "kind": "stage1",
        "state_dict": state_dict,
        "full_state_dict_keys": sorted(model.full_state_dict().keys()),
        "dataset_files": files,
        "coco_panoptic": coco_data,
        "dataset_id_to_contiguous_id": dict(metadata.dataset_id_to_contiguous_id),
        "stuff_dataset_id_to_contiguous_id": dict(getattr(metadata, "stuff_dataset_id_to_contiguous_id", {})),
        "train_losses": losses,
        "xsam_pq": pq,
        "sensitivity_to_1e-6_weight_noise": sensitivity,
        "inputs": {},
        "outputs": {"per_image": per_image},
        "_configs": configs,
    }
