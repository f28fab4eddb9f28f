"""COCO-panoptic data path: writer -> on-disk format -> registration/loading -> LSJ mapper.

Scenes: coloured rectangles ("rect") and ellipses ("ellipse") on a noisy grey "background" stuff
segment. Category ids are deliberately non-contiguous and the stuff category is listed first, to
check the contiguous-id mapping (things first).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, List, Tuple

import cv2
import flowseg  # noqa: F401  (registers datasets and mappers)
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from flowseg import add_flowseg_config
from flowseg.data import MAPPER_REGISTRY, build_test_mapper, build_train_mapper
from flowseg.data.build import mapper_name_for_dataset
from flowseg.data.dataset_mappers import COCOPanopticLSJDatasetMapper
from flowseg.data.datasets import coco_panoptic_metadata, register_coco_panoptic_dataset
from flowseg.data.writers import register_coco_panoptic_folder, write_coco_panoptic_dataset
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools.coco import COCO
from repo_scripts import load_script

CATEGORIES = [
    {"id": 7, "name": "background", "isthing": 0, "color": [128, 128, 128]},
    {"id": 1, "name": "rect", "isthing": 1, "color": [220, 40, 40]},
    {"id": 3, "name": "ellipse", "isthing": 1, "color": [40, 60, 220]},
]
# Object colours: far from the grey background and from each other.
COLOURS = {1: (220, 40, 40), 3: (40, 60, 220)}
CONTIGUOUS = {1: 0, 3: 1, 7: 2}  # things first, in category order, then stuff


def make_scenes(
    n: int, h: int = 96, w: int = 128, seed: int = 0, crowd_first: bool = False
) -> Tuple[List[np.ndarray], List[List[Dict[str, Any]]]]:
    """``n`` images with 1-3 non-overlapping objects each and a background stuff segment."""
    rng = np.random.default_rng(seed)
    images, segments = [], []
    for i in range(n):
        img = np.clip(rng.normal(128, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
        taken = np.zeros((h, w), dtype=bool)
        segs: List[Dict[str, Any]] = []
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(50):
                cat = int(rng.choice([1, 3]))
                bh, bw = int(rng.integers(h // 5, h // 2)), int(rng.integers(w // 5, w // 2))
                y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
                mask = np.zeros((h, w), dtype=np.uint8)
                if cat == 1:
                    mask[y0 : y0 + bh, x0 : x0 + bw] = 1
                else:
                    cv2.ellipse(mask, (x0 + bw // 2, y0 + bh // 2), (bw // 2, bh // 2), 0, 0, 360, 1, -1)
                mask = mask.astype(bool)
                # keep a 2-pixel gap so that resizing never mixes two objects' colours
                grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
                if not (grown & taken).any():
                    break
            else:
                continue
            taken |= mask
            img[mask] = COLOURS[cat]
            segs.append({"mask": mask, "category_id": cat, "iscrowd": 0})
        if crowd_first and i == 0:
            segs[0]["iscrowd"] = 1
        segs.append({"mask": ~taken, "category_id": 7, "iscrowd": 0})
        images.append(img)
        segments.append(segs)
    return images, segments


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = str(tmp_path_factory.mktemp("coco_panoptic"))
    images, segments = make_scenes(6, crowd_first=True)
    paths = write_coco_panoptic_dataset(root, images, segments, CATEGORIES, split="train")
    name = "test_cpd_train_panoptic_with_sem_seg"
    register_coco_panoptic_folder(name, root, "train", overwrite=True)
    return {"root": root, "paths": paths, "name": name, "images": images, "segments": segments}


def _cfg(image_size: int = 128, min_scale: float = 0.5, max_scale: float = 1.0, flip: str = "horizontal"):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.INPUT.IMAGE_SIZE = image_size
    cfg.INPUT.MIN_SCALE = min_scale
    cfg.INPUT.MAX_SCALE = max_scale
    cfg.INPUT.RANDOM_FLIP = flip
    cfg.INPUT.FORMAT = "RGB"
    return cfg


# ---------------------------------------------------------------------------------------------- writer
def test_written_layout_is_mask2former_coco(written: Dict[str, Any]) -> None:
    root = written["root"]
    for rel in (
        "train2017/000000000001.jpg",
        "panoptic_train2017/000000000001.png",
        "panoptic_semseg_train2017/000000000001.png",
        "annotations/panoptic_train2017.json",
        "annotations/instances_train2017.json",
    ):
        assert os.path.isfile(os.path.join(root, rel)), rel
    with open(written["paths"]["panoptic_json"]) as f:
        pan = json.load(f)
    assert {"images", "annotations", "categories"} <= set(pan)
    assert len(pan["images"]) == len(pan["annotations"]) == 6
    seg = pan["annotations"][0]["segments_info"][0]
    assert {"id", "category_id", "iscrowd", "bbox", "area"} <= set(seg)


def test_instances_json_decodes_to_the_input_masks(written: Dict[str, Any]) -> None:
    coco = COCO(written["paths"]["instances_json"])
    assert sorted(coco.getCatIds()) == [1, 3]  # things only
    for image_id, segs in zip(range(1, 7), written["segments"]):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        things = [s for s in segs if s["category_id"] != 7]
        assert len(anns) == len(things)
        for ann, seg in zip(anns, things):
            assert ann["category_id"] == seg["category_id"]
            assert ann["iscrowd"] == seg["iscrowd"]
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), seg["mask"])


def test_writer_rejects_overlapping_and_empty_masks(tmp_path) -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    m = np.zeros((8, 8), bool)
    m[2:5, 2:5] = True
    with pytest.raises(ValueError, match="overlaps"):
        write_coco_panoptic_dataset(
            str(tmp_path), [img], [[{"mask": m, "category_id": 1}, {"mask": m, "category_id": 3}]], CATEGORIES
        )
    with pytest.raises(ValueError, match="empty mask"):
        write_coco_panoptic_dataset(
            str(tmp_path), [img], [[{"mask": np.zeros((8, 8), bool), "category_id": 1}]], CATEGORIES
        )
    with pytest.raises(ValueError, match="category_id 5"):
        write_coco_panoptic_dataset(str(tmp_path), [img], [[{"mask": m, "category_id": 5}]], CATEGORIES)


# ---------------------------------------------------------------------------------------------- loading
def test_metadata(written: Dict[str, Any]) -> None:
    meta = MetadataCatalog.get(written["name"])
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.thing_classes == ["rect", "ellipse"]
    assert meta.stuff_classes == ["rect", "ellipse", "background"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1}
    assert meta.stuff_dataset_id_to_contiguous_id == CONTIGUOUS
    assert meta.stuff_colors[2] == [128, 128, 128]
    assert meta.ignore_label == 255 and meta.label_divisor == 1000
    assert meta.panoptic_json == written["paths"]["panoptic_json"]
    assert meta.panoptic_root == written["paths"]["panoptic_root"]
    assert meta.json_file == written["paths"]["instances_json"]
    assert meta.sem_seg_root == written["paths"]["sem_seg_root"]


def test_load_round_trips_segments_exactly(written: Dict[str, Any]) -> None:
    dicts = DatasetCatalog.get(written["name"])
    assert [d["image_id"] for d in dicts] == list(range(1, 7))
    for d, img, segs in zip(dicts, written["images"], written["segments"]):
        assert (d["height"], d["width"]) == img.shape[:2]
        jpg = np.asarray(Image.open(d["file_name"]).convert("RGB"), dtype=np.float32)
        assert np.abs(jpg - img).mean() < 5  # JPEG (quality 95, 4:4:4) of pure noise
        pan = rgb2id(np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB")))
        sem = np.asarray(Image.open(d["sem_seg_file_name"]))
        assert len(d["segments_info"]) == len(segs)
        covered = np.zeros(pan.shape, bool)
        for info, seg in zip(d["segments_info"], segs):
            mask = pan == info["id"]
            np.testing.assert_array_equal(mask, seg["mask"])
            assert info["category_id"] == CONTIGUOUS[seg["category_id"]]
            assert info["isthing"] == (seg["category_id"] != 7)
            assert info["iscrowd"] == seg["iscrowd"]
            assert (sem[mask] == CONTIGUOUS[seg["category_id"]]).all()
            covered |= mask
        assert (sem[~covered] == 255).all()


def test_builtin_with_sem_seg_names_are_registered() -> None:
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"coco_2017_{split}_panoptic_with_sem_seg")
        assert meta.evaluator_type == "coco_panoptic_seg"
        assert meta.panoptic_root == os.path.join(root, f"coco/panoptic_{split}2017")
        assert meta.sem_seg_root == os.path.join(root, f"coco/panoptic_semseg_{split}2017")
        assert meta.json_file == os.path.join(root, f"coco/annotations/instances_{split}2017.json")
        assert len(meta.thing_classes) == 80 and len(meta.stuff_classes) == 133
        assert meta.thing_dataset_id_to_contiguous_id[90] == 79  # toothbrush, last thing
    # Detectron2's own names are untouched
    assert "coco_2017_val_panoptic" in DatasetCatalog.list()


def test_missing_files_name_the_path(written: Dict[str, Any], tmp_path) -> None:
    root = str(tmp_path / "copy")
    shutil.copytree(written["root"], root)
    register_coco_panoptic_folder("test_cpd_missing", root, categories=CATEGORIES, overwrite=True)

    os.remove(os.path.join(root, "panoptic_train2017", "000000000002.png"))
    with pytest.raises(FileNotFoundError, match="panoptic_train2017/000000000002.png"):
        DatasetCatalog.get("test_cpd_missing")
    os.remove(os.path.join(root, "train2017", "000000000001.jpg"))
    with pytest.raises(FileNotFoundError, match="train2017/000000000001.jpg"):
        DatasetCatalog.get("test_cpd_missing")
    shutil.rmtree(os.path.join(root, "panoptic_semseg_train2017"))
    with pytest.raises(FileNotFoundError, match="panoptic_train2017/000000000002.png"):
        DatasetCatalog.get("test_cpd_missing")  # making the semantic PNGs needs every panoptic PNG
    assert not os.path.exists(os.path.join(root, "panoptic_semseg_train2017"))
    assert not [n for n in os.listdir(root) if ".tmp" in n]  # nothing half-written is left
    os.remove(os.path.join(root, "annotations", "panoptic_train2017.json"))
    with pytest.raises(FileNotFoundError, match="annotations/panoptic_train2017.json"):
        DatasetCatalog.get("test_cpd_missing")
    # reading the categories at registration names the file as well
    with pytest.raises(FileNotFoundError, match="panoptic_train2017.json"):
        register_coco_panoptic_folder("test_cpd_missing2", root, overwrite=True)


def test_missing_semantic_pngs_are_made_and_logged(written: Dict[str, Any], tmp_path, caplog) -> None:
    root = str(tmp_path / "copy")
    shutil.copytree(written["root"], root)
    sem_dir = os.path.join(root, "panoptic_semseg_train2017")
    shutil.rmtree(sem_dir)
    register_coco_panoptic_dataset(
        "test_cpd_nosem",
        coco_panoptic_metadata(CATEGORIES),
        os.path.join(root, "train2017"),
        os.path.join(root, "panoptic_train2017"),
        os.path.join(root, "annotations", "panoptic_train2017.json"),
        sem_seg_root=sem_dir,
        overwrite=True,
    )
    with caplog.at_level(logging.INFO, logger="flowseg"):
        dicts = DatasetCatalog.get("test_cpd_nosem")
    assert "Semantic PNG folder " + sem_dir + " not found: making it" in caplog.text
    names = sorted(os.listdir(written["paths"]["sem_seg_root"]))
    assert sorted(os.listdir(sem_dir)) == names and len(dicts) == len(names)
    for n in names:
        np.testing.assert_array_equal(
            np.asarray(Image.open(os.path.join(sem_dir, n))),
            np.asarray(Image.open(os.path.join(written["paths"]["sem_seg_root"], n))),
        )
    # one PNG missing from an existing folder: the error names the command that makes them
    os.remove(os.path.join(sem_dir, names[0]))
    with pytest.raises(FileNotFoundError, match=r"make them with: python datasets/prepare_coco_semantic"):
        DatasetCatalog.get("test_cpd_nosem")


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda j: "{not json", r"not a valid JSON"),
        (lambda j: json.dumps({k: v for k, v in j.items() if k != "annotations"}), r"'annotations'"),
        (
            lambda j: json.dumps(
                {**j, "annotations": [{k: v for k, v in j["annotations"][0].items() if k != "segments_info"}]}
            ),
            r"image_id=1\).*'segments_info'",
        ),
        (
            lambda j: json.dumps(
                {**j, "annotations": [{k: v for k, v in j["annotations"][0].items() if k != "file_name"}]}
            ),
            r"image_id=1\).*'file_name'",
        ),
        (
            lambda j: json.dumps(
                {
                    **j,
                    "annotations": j["annotations"][:2]
                    + [
                        {
                            **j["annotations"][2],
                            "segments_info": [{**j["annotations"][2]["segments_info"][0], "category_id": 42}],
                        }
                    ],
                }
            ),
            r"image_id=3.*category_id 42 is not one of the dataset's categories \[1, 3, 7\] "
            r"\(from the categories given to register_coco_panoptic_folder\('test_cpd_bad'\)\)",
        ),
    ],
    ids=["not-json", "no-annotations", "no-segments_info", "no-file_name", "unknown-category"],
)
def test_malformed_json_names_the_file(written: Dict[str, Any], tmp_path, corrupt, match: str) -> None:
    root = str(tmp_path / "copy")
    shutil.copytree(written["root"], root)
    register_coco_panoptic_folder("test_cpd_bad", root, categories=CATEGORIES, overwrite=True)
    pan_json = os.path.join(root, "annotations", "panoptic_train2017.json")
    with open(pan_json) as f:
        original = json.load(f)
    with open(pan_json, "w") as f:
        f.write(corrupt(original))
    with pytest.raises(ValueError, match=match) as exc:
        DatasetCatalog.get("test_cpd_bad")
    assert pan_json in str(exc.value)


# ---------------------------------------------------------------------------------------------- mappers
def _check_alignment(out: Dict[str, Any], size: int) -> List[int]:
    image = out["image"].permute(1, 2, 0).numpy().astype(np.float32)
    assert image.shape == (size, size, 3)
    inst = out["instances"]
    assert inst.image_size == (size, size)
    assert inst.gt_masks.dtype == np.bool_ or str(inst.gt_masks.dtype) == "torch.bool"
    assert inst.gt_masks.shape == (len(inst), size, size)
    classes = inst.gt_classes.tolist()
    for mask, cls, box in zip(inst.gt_masks.numpy(), classes, inst.gt_boxes.tensor.numpy()):
        assert mask.any()
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        # interior (eroded) pixels carry the object's colour: masks sit on the right pixels
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if inner.sum() < 4:
            continue
        mean = image[inner].mean(0)
        if cls == 2:  # background: grey noise
            assert np.abs(mean - 128).max() < 25, mean
        else:
            expected = COLOURS[{0: 1, 1: 3}[cls]]
            assert np.abs(mean - expected).max() < 25, (cls, mean)
    return classes


def test_lsj_mapper_masks_align_with_image_and_classes(written: Dict[str, Any]) -> None:
    np.random.seed(0)  # Detectron2's augmentations draw from numpy's global RNG
    mapper = build_train_mapper(_cfg(min_scale=0.5, max_scale=1.0))
    assert isinstance(mapper, COCOPanopticLSJDatasetMapper)
    dicts = DatasetCatalog.get(written["name"])
    for d, segs in zip(dicts, written["segments"]):
        for _ in range(3):
            out = mapper(d)
            classes = _check_alignment(out, 128)
            # scale <= 1: nothing is cropped away; crowd segments are dropped
            expected = sorted(CONTIGUOUS[s["category_id"]] for s in segs if not s["iscrowd"])
            assert sorted(classes) == expected
    assert "pan_seg_file_name" not in out
    assert d["pan_seg_file_name"]  # the mapper did not modify the dataset dict


def test_lsj_mapper_crop_and_flip(written: Dict[str, Any]) -> None:
    np.random.seed(1)
    mapper = build_train_mapper(_cfg(image_size=64, min_scale=1.0, max_scale=2.0))
    d = DatasetCatalog.get(written["name"])[1]
    seen_sizes = set()
    for _ in range(8):
        out = mapper(d)
        _check_alignment(out, 64)
        seen_sizes.add(tuple(out["image"].shape))
    assert seen_sizes == {(3, 64, 64)}
    # horizontal flip: with flip forced on, the gt mask of the first object is mirrored
    from detectron2.data import transforms as T

    flip_mapper = COCOPanopticLSJDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB"
    )
    plain_mapper = COCOPanopticLSJDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    a, b = flip_mapper(d)["instances"].gt_masks, plain_mapper(d)["instances"].gt_masks
    assert (a.numpy() == b.numpy()[:, :, ::-1]).all()
    np.testing.assert_array_equal(b[0].numpy(), written["segments"][1][0]["mask"])


def test_lsj_mapper_with_crowd_only_image_gives_empty_instances(written: Dict[str, Any]) -> None:
    d = dict(DatasetCatalog.get(written["name"])[0])
    d["segments_info"] = [dict(s, iscrowd=1) for s in d["segments_info"]]
    out = COCOPanopticLSJDatasetMapper(is_train=True, augmentations=[], image_format="RGB")(d)
    assert len(out["instances"]) == 0 and out["instances"].gt_masks.shape == (0, 96, 128)


def test_test_mapper_resizes_long_side_and_keeps_original_size(written: Dict[str, Any]) -> None:
    mapper = build_test_mapper(_cfg(image_size=64), written["name"])
    assert isinstance(mapper, DatasetMapper)
    d = DatasetCatalog.get(written["name"])[0]
    out = mapper(d)
    assert tuple(out["image"].shape) == (3, 48, 64)  # 96x128 -> long side 64
    assert (out["height"], out["width"]) == (96, 128)
    assert "instances" not in out and "sem_seg_file_name" not in out


def test_mapper_registry_by_name() -> None:
    cfg = _cfg()
    assert "coco_panoptic_lsj" in MAPPER_REGISTRY
    cfg.INPUT.DATASET_MAPPER_NAME = "no_such_mapper"
    with pytest.raises(KeyError, match="no_such_mapper.*coco_panoptic_lsj"):
        build_train_mapper(cfg)

    calls = []

    @MAPPER_REGISTRY.register("test_cpd_custom")
    def _factory(cfg, is_train):  # noqa: ANN001
        calls.append(is_train)
        return lambda d: d

    try:
        cfg.INPUT.DATASET_MAPPER_NAME = "test_cpd_custom"
        build_train_mapper(cfg)
        assert calls == [True]
        # test datasets: explicit metadata name > mapper of the evaluator type > the config's name
        MetadataCatalog.get("test_cpd_explicit").set(
            evaluator_type="refer", dataset_mapper_name="test_cpd_custom"
        )
        build_test_mapper(cfg, "test_cpd_explicit")
        assert calls == [True, False]
        MetadataCatalog.get("test_cpd_refer").set(evaluator_type="refer")
        assert mapper_name_for_dataset(cfg, "test_cpd_refer") == "referring"  # registered by flowseg.data
        MetadataCatalog.get("test_cpd_other").set(evaluator_type="something_else")
        assert mapper_name_for_dataset(cfg, "test_cpd_other") == "test_cpd_custom"
    finally:
        MAPPER_REGISTRY._obj_map.pop("test_cpd_custom")


def test_prepare_semantic_script_reproduces_written_pngs(written: Dict[str, Any], tmp_path) -> None:
    out_dir = str(tmp_path / "semseg")
    # the script's CLI, run in-process (a subprocess would spend seconds re-importing torch)
    script = load_script("datasets/prepare_coco_semantic_annos_from_panoptic_annos.py")
    script.main(
        [
            "--panoptic-json",
            written["paths"]["panoptic_json"],
            "--panoptic-root",
            written["paths"]["panoptic_root"],
            "--output-dir",
            out_dir,
            "--workers",
            "1",
        ]
    )
    names = sorted(os.listdir(written["paths"]["sem_seg_root"]))
    assert sorted(os.listdir(out_dir)) == names
    for n in names:
        a = np.asarray(Image.open(os.path.join(out_dir, n)))
        b = np.asarray(Image.open(os.path.join(written["paths"]["sem_seg_root"], n)))
        np.testing.assert_array_equal(a, b)
