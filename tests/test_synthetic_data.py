"""The synthetic referring benchmark: semantics of the expressions and the on-disk round trip."""

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from flowseg.data.dataset_mappers.referring import gt_masks_from_dict
from flowseg.data.synthetic import generate_scene, generate_synthetic_datasets, register_synthetic_datasets
from flowseg.data.synthetic.scenes import COLOURS, expression_kind, resolve


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(123)
    return [generate_scene(rng, image_size=96) for _ in range(60)]


def test_expressions_unique_and_resolve_to_their_target(scenes):
    margin = 0.08 * 96
    for scene in scenes:
        texts = [e.text for e in scene.expressions]
        assert len(texts) == len(set(texts)), texts
        for e in scene.expressions:
            assert resolve(e.program, scene.objects, margin) == [e.target], e.text


def test_expression_kind_is_read_back_from_the_wording(scenes):
    expressions = [e for s in scenes for e in s.expressions]
    assert [expression_kind(e.text) for e in expressions] == [e.kind for e in expressions]
    for bad in ("", "red circle", "a red circle"):
        with pytest.raises(ValueError, match="not a synthetic referring expression"):
            expression_kind(bad)


def test_every_object_has_a_distractor(scenes):
    for scene in scenes:
        for i, o in enumerate(scene.objects):
            assert any(
                j != i and (p.shape == o.shape or p.colour == o.colour) for j, p in enumerate(scene.objects)
            )


def test_all_expression_kinds_and_implicit_queries_occur(scenes):
    kinds = {e.kind for s in scenes for e in s.expressions}
    assert kinds == {"attribute", "superlative", "relation"}
    queries = [q for s in scenes for q in s.reasoning]
    assert queries
    for q in queries:  # implicit: the colour word itself is never said
        assert not any(c in q.short.split() for c in COLOURS)


def test_visible_masks_are_disjoint_and_painted(scenes):
    for scene in scenes:
        stack = np.stack([o.mask for o in scene.objects])
        assert stack.sum(0).max() <= 1  # occlusion leaves each pixel to one object
        for o in scene.objects:
            assert o.mask.sum() > 0
            rgb = scene.image[o.mask].astype(float).mean(0)
            assert np.abs(rgb - np.asarray(COLOURS[o.colour])).max() < 30


def test_generation_is_deterministic():
    a = generate_scene(np.random.default_rng(7), image_size=64)
    b = generate_scene(np.random.default_rng(7), image_size=64)
    assert np.array_equal(a.image, b.image)
    assert [e.text for e in a.expressions] == [e.text for e in b.expressions]


def test_written_formats_round_trip_through_the_real_loaders(tmp_path):
    root = str(tmp_path)
    generate_synthetic_datasets(root, {"train": 4, "val": 3, "test": 2}, seed=5, image_size=64)
    register_synthetic_datasets(root)
    from flowseg.data.synthetic.generate import generate_split

    scenes = generate_split("val", 3, seed=5, image_size=64)
    refs = DatasetCatalog.get("synthref_val")
    assert len(refs) == sum(len(s.expressions) for s in scenes)
    by_text = {}
    for i, s in enumerate(scenes):
        for e in s.expressions:
            by_text[(i, e.text)] = s.objects[e.target].mask
    image_ids = sorted({d["image_id"] for d in refs})
    for d in refs:
        gt, _ = gt_masks_from_dict(d)
        expected = by_text[(image_ids.index(d["image_id"]), d["expression"])]
        assert np.array_equal(gt.astype(bool), expected), d["expression"]

    reason = DatasetCatalog.get("synthreason_val")
    assert {d["is_sentence"] for d in reason} <= {True, False}
    for d in reason:
        gt, ignore = gt_masks_from_dict(d)
        i = int(d["image_id"].rsplit("_", 1)[1])
        ious = [
            (gt.astype(bool) & o.mask).sum() / (gt.astype(bool) | o.mask).sum() for o in scenes[i].objects
        ]
        assert max(ious) > 0.9  # polygons traced from the mask
        assert not ignore.any()

    pan = DatasetCatalog.get("synthpan_val")
    assert len(pan) == 3
    assert all(len(d["segments_info"]) == len(s.objects) + 1 for d, s in zip(pan, scenes))

    # a second call with the same parameters does not rewrite anything
    manifest = tmp_path / "synthetic_manifest.json"
    mtime = manifest.stat().st_mtime_ns
    generate_synthetic_datasets(root, {"train": 4, "val": 3, "test": 2}, seed=5, image_size=64)
    assert manifest.stat().st_mtime_ns == mtime
