"""Scene vocabularies: the default one's output is unchanged, the variant one is a valid second
benchmark with none of its shape / colour words, and tools/make_variant_data.py writes it where
the builtin RefCOCO / COCO-panoptic names read it."""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from flowseg.data.datasets.coco_panoptic import BUILTIN_CATEGORIES_FILE, builtin_coco_categories
from flowseg.data.synthetic import generate_scene, resolve
from flowseg.data.synthetic.generate import generate_split, panoptic_categories
from flowseg.data.synthetic.scenes import expression_kind
from flowseg.data.synthetic.shapes import DRAWINGS, shape_mask
from flowseg.data.synthetic.vocabulary import DEFAULT_VOCABULARY, VARIANT_VOCABULARY, get_vocabulary
from repo_scripts import load_script

V = VARIANT_VOCABULARY


@pytest.fixture(scope="module")
def variant_scenes():
    rng = np.random.default_rng(321)
    return [generate_scene(rng, image_size=96, vocabulary=V) for _ in range(40)]


def test_default_scene_is_the_one_written_before_vocabularies():
    # recorded with the generator as it was before vocabularies existed (same seed and size)
    s = generate_scene(np.random.default_rng(2024), image_size=64)
    assert [(o.shape, o.colour, o.size, int(o.mask.sum())) for o in s.objects] == [
        ("circle", "green", "large", 253),
        ("triangle", "green", "small", 44),
        ("circle", "red", "small", 49),
    ]
    assert [(e.text, e.target) for e in s.expressions] == [
        ("the green circle", 0),
        ("the leftmost green shape", 0),
        ("the circle below the red shape", 0),
        ("the triangle", 1),
        ("the topmost green shape", 1),
        ("the triangle above the green circle", 1),
        ("the red shape", 2),
        ("the leftmost circle", 2),
        ("the circle above the triangle", 2),
    ]
    assert [q.short for q in s.reasoning] == [
        "the shape with no corners at all that has the colour of fresh grass",
        "the shape with exactly three corners that has the colour of fresh grass",
        "the shape with no corners at all that has the colour of a ripe tomato",
    ]
    assert hashlib.sha256(s.image.tobytes()).hexdigest() == (
        "37bfd87091fbf5e3270e2d9dcbaf878aad37005043c85dcd2f74a127ea284ebd"
    )


def test_variant_expressions_denote_exactly_their_target(variant_scenes):
    margin = 0.08 * 96
    for scene in variant_scenes:
        texts = [e.text for e in scene.expressions]
        assert len(texts) == len(set(texts)), texts
        for e in scene.expressions:
            assert resolve(e.program, scene.objects, margin, V) == [e.target], e.text
            assert expression_kind(e.text, V) == e.kind, e.text
    kinds = {e.kind for s in variant_scenes for e in s.expressions}
    assert kinds == {"attribute", "superlative", "relation"}
    assert any(q for s in variant_scenes for q in s.reasoning)


def test_variant_shares_no_shape_colour_size_or_superlative_word_with_the_default(variant_scenes):
    d, v = DEFAULT_VOCABULARY.words(), V.words()
    for kind in ("shape", "colour", "size", "noun", "superlative"):
        assert not d[kind] & v[kind], kind
    assert not set(DEFAULT_VOCABULARY.relations) & set(V.relations)
    default_words = d["shape"] | d["colour"] | d["size"] | d["noun"] | d["superlative"]
    for scene in variant_scenes:
        for text in [e.text for e in scene.expressions] + [q.short for q in scene.reasoning]:
            assert not set(text.split()) & default_words, text
        for q in scene.reasoning:  # implicit: the variant's own names are never said either
            assert not set(q.long.replace(".", " ").split()) & (v["shape"] | v["colour"]), q.long


def test_variant_objects_are_painted_in_distinguishable_colours(variant_scenes):
    rgbs = np.array(list(V.colours.values()), dtype=float)
    pairwise = np.abs(rgbs[:, None] - rgbs[None]).max(-1)
    assert pairwise[~np.eye(len(rgbs), dtype=bool)].min() >= 90
    # the background is grey between ~70 and ~200: a colour is saturated or outside that range
    assert all(c.max() - c.min() >= 80 or c.min() > 220 for c in rgbs)
    for scene in variant_scenes:
        for o in scene.objects:
            assert o.shape in V.shapes and o.colour in V.colours and o.size in V.sizes
            assert np.abs(scene.image[o.mask].astype(float).mean(0) - V.colours[o.colour]).max() < 30


def test_drawings_are_distinct_shapes_of_about_the_radius():
    size, r, center = 200, 40.0, (100.0, 100.0)
    masks = {d: shape_mask(d, center, r, 0.3, size) for d in DRAWINGS}
    for d, m in masks.items():
        assert 0.8 * r * r < m.sum() < 2.5 * np.pi * r * r, d  # filled, within ~1.5 r of the centre
    names = list(V.shapes.values())  # (the default's circle and hexagon overlap more)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.85, (a, b, iou)
    with pytest.raises(ValueError, match="unknown shape drawing 'blob'"):
        shape_mask("blob", center, r, 0.0, size)


def test_bad_vocabularies_are_refused_with_the_cause():
    with pytest.raises(ValueError, match=r"shapes \['blob'\] have no drawing"):
        replace(V, shapes={**V.shapes, "blob": "blob"})
    with pytest.raises(ValueError, match="needs exactly one hint"):
        replace(V, colour_hints={k: h for k, h in V.colour_hints.items() if k != "navy"})
    with pytest.raises(ValueError, match="need one"):
        replace(V, superlatives={"highest": (1, -1)})
    with pytest.raises(KeyError, match="unknown scene vocabulary 'nope'"):
        get_vocabulary("nope")
    assert get_vocabulary("variant") is V


def test_builtin_coco_categories_default_to_coco_and_read_the_file(tmp_path):
    cats, source = builtin_coco_categories(str(tmp_path), str(tmp_path / "none.json"))
    assert len(cats) == 133 and "none.json not found" in source
    path = tmp_path / BUILTIN_CATEGORIES_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"categories": [{"id": 3, "name": "x"}]}))
    with pytest.raises(ValueError, match=r"panoptic_categories.json: category #0 needs"):
        builtin_coco_categories(str(tmp_path))


_LOAD = """
import json, flowseg
from detectron2.data import DatasetCatalog, MetadataCatalog
out = {}
for split in ("train", "val", "testA", "testB"):
    out[split] = sorted(d["expression"] for d in DatasetCatalog.get("refcoco_unc_" + split))
for split in ("train", "val"):
    name = "coco_2017_%s_panoptic_with_sem_seg" % split
    out["pan_" + split] = [len(d["segments_info"]) for d in DatasetCatalog.get(name)]
    out["classes_" + split] = MetadataCatalog.get(name).stuff_classes
print("RESULT" + json.dumps(out))
"""


def test_tool_output_loads_through_the_builtin_names(tmp_path):
    tool = load_script("tools/make_variant_data.py")
    manifest = tool.write_variant_data(str(tmp_path), num_train=4, num_eval=2, seed=1, image_size=64)
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for split, stream in tool.REFER_STREAMS.items():  # the scenes again, from their own stream
        n = 4 if split == "train" else 2
        scenes = generate_split("train", n, 1, 64, vocabulary=V, stream=stream)
        assert out[split] == sorted(e.text for s in scenes for e in s.expressions), split
        assert manifest["counts"][split]["expressions"] == len(out[split])
        if split in ("train", "val"):  # one segment per object plus the background
            assert out["pan_" + split] == [len(s.objects) + 1 for s in scenes]
    names = [c["name"] for c in panoptic_categories(V)]
    assert len(names) == 37 and names[0] == "cyan diamond" and names[-1] == "background"
    assert out["classes_train"] == out["classes_val"] == names
