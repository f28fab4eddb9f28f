"""Referring / reasoning expressions grouped by image and by object (training with
``INPUT.EXPRESSIONS_PER_IMAGE > 1`` and ``INPUT.PACK_EXPRESSIONS``)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Set

import numpy as np

__all__ = ["group_expressions_by_image", "object_key", "object_keys", "objects_of", "split_groups_by_objects"]


def group_expressions_by_image(dataset_dicts: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per-expression dicts -> one dict per image, its expressions under ``"expressions"``.

    The training form for ``INPUT.EXPRESSIONS_PER_IMAGE > 1`` (LISA samples several expressions of
    an image per sample as well): the mapper then picks that many of them and shares one image
    read, one augmentation and, in the model, one image encoding between them. Images keep the
    order of their first expression; an image is identified by ``image_id`` else ``file_name``.
    """
    groups: Dict[Any, Dict[str, Any]] = {}
    for d in dataset_dicts:
        key = d.get("image_id", d.get("file_name"))
        if key not in groups:
            groups[key] = {k: d[k] for k in ("file_name", "height", "width", "image_id") if k in d}
            groups[key]["expressions"] = []
        groups[key]["expressions"].append(d)
    return list(groups.values())


def object_key(d: Dict[str, Any]) -> Any:
    # expressions of one object (RefCOCO: one ref = one annotation, several sentences); a gRefCOCO
    # expression denotes a set of annotations (none for a no-target expression)
    if "ann_ids" in d:
        return ("ann_ids", tuple(sorted(d["ann_ids"])))
    for k in ("ann_id", "ref_id"):
        if k in d:
            return (k, d[k])
    return ("id", id(d))


def object_keys(d: Dict[str, Any]) -> Set[Any]:
    """The annotations an expression denotes; two expressions whose sets intersect share a target."""
    if "ann_ids" in d:
        return {("ann_id", a) for a in d["ann_ids"]}
    return {object_key(d)}


def objects_of(expressions: Sequence[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """Expressions grouped by object, objects in order of first appearance."""
    by_object: Dict[Any, List[Dict[str, Any]]] = {}
    for d in expressions:
        by_object.setdefault(object_key(d), []).append(d)
    return list(by_object.values())


def split_groups_by_objects(groups: Sequence[Dict[str, Any]], max_objects: int) -> List[Dict[str, Any]]:
    """X-SAM's referring training samples from per-image groups (:func:`group_expressions_by_image`).

    An image's objects (ordered by ``ann_id``) are cut into chunks of at most ``max_objects``;
    with ``PACK_MODE = "all_objects"`` the mapper packs every object of a chunk, one expression
    each. X-SAM enumerates ``min(sum_o n_o, prod_o n_o)`` sentence combinations per image
    (``n_o`` sentences of object ``o``) and cuts each into the same chunks, so each chunk is
    repeated that many times here: images are drawn as often as in X-SAM, and one pass over the
    list has X-SAM's number of samples per epoch.
    """
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    out: List[Dict[str, Any]] = []
    for group in groups:
        objects = objects_of(group["expressions"])
        objects.sort(key=lambda exprs: (exprs[0].get("ann_id") is None, exprs[0].get("ann_id", 0)))
        counts = [len(exprs) for exprs in objects]
        repeats = min(sum(counts), int(np.prod(counts, dtype=np.float64)))
        for i in range(0, len(objects), max_objects):
            chunk = {k: v for k, v in group.items() if k != "expressions"}
            chunk["expressions"] = [d for exprs in objects[i : i + max_objects] for d in exprs]
            out += [chunk] * repeats
    return out
