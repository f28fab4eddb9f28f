"""Where the categories of a COCO-panoptic data set come from, for the builtin names too.

The builtin ``coco_2017_{train,val}_panoptic_with_sem_seg`` names take their categories, in this
order, from

1. ``coco/annotations/panoptic_categories.json`` under the data root (:data:`BUILTIN_CATEGORIES_FILE`,
   ``{"categories": [{id, name, isthing, color}, ...]}``), an explicit override shared by every
   process;
2. the ``categories`` list of the split's own panoptic json (real COCO's lists COCO's 133);
3. COCO's 133 (Detectron2's ``COCO_CATEGORIES``) when the json is not there (nothing can be
   trained or evaluated then) or lists no categories (a WARNING says so).

Categories other than COCO's are logged with their source. They are read when the metadata's
class keys are first used (:class:`JsonCategoriesMetadata`), not when ``flowseg`` is imported; the
metadata key ``categories_source`` says where they came from, for error messages.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from detectron2.data.catalog import Metadata
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_CATEGORIES_FILE",
    "CATEGORY_KEYS",
    "JsonCategoriesMetadata",
    "builtin_coco_categories",
    "check_categories",
    "json_categories",
]

#: Under the data root: categories that replace the panoptic json's for the builtin names.
BUILTIN_CATEGORIES_FILE = os.path.join("coco", "annotations", "panoptic_categories.json")
#: The metadata keys derived from the categories (and where they came from).
CATEGORY_KEYS = (
    "thing_classes",
    "thing_colors",
    "stuff_classes",
    "stuff_colors",
    "thing_dataset_id_to_contiguous_id",
    "stuff_dataset_id_to_contiguous_id",
    "categories_source",
)
# Larger panoptic jsons (COCO's train json is hundreds of MB) are first searched from the end,
# where COCO and the writers of this package put "categories".
_TAIL_BYTES = 1 << 20
_FULL_PARSE_BYTES = 16 << 20


def check_categories(cats: Any, path: str) -> List[Dict[str, Any]]:
    """``cats`` if it is a non-empty list of ``{id, name, isthing}``; else ``ValueError`` naming ``path``."""
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"{path}: expected {{'categories': [{{id, name, isthing}}, ...]}}")
    for k, c in enumerate(cats):
        if not isinstance(c, dict) or not {"id", "name", "isthing"} <= set(c):
            raise ValueError(f"{path}: category #{k} needs 'id', 'name' and 'isthing': {c!r}")
    return cats


def _tail_categories(path: str) -> Optional[list]:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
        tail = f.read().decode("utf-8", errors="replace")
    key = tail.rfind('"categories"')
    start = tail.find("[", key) if key >= 0 else -1
    if start < 0:
        return None
    try:
        cats, _ = json.JSONDecoder().raw_decode(tail[start:])
    except ValueError:
        return None
    return cats if isinstance(cats, list) else None


def json_categories(path: str) -> Optional[List[Dict[str, Any]]]:
    """The ``categories`` list of a COCO(-panoptic) json (None when it has none); a file that is
    not valid JSON, or a malformed list, is an error naming it."""
    from .coco_panoptic import read_annotation_json

    cats = _tail_categories(path) if os.path.getsize(path) > _FULL_PARSE_BYTES else None
    if cats is not None:
        try:
            return check_categories(cats, path)
        except ValueError:
            pass  # another list that happens to follow a "categories" string: read the whole file
    info = read_annotation_json(path)
    cats = info.get("categories") if isinstance(info, dict) else None
    return None if cats is None else check_categories(cats, path)


def _same_as_coco(cats: List[Dict[str, Any]]) -> bool:
    return [(int(c["id"]), c["name"]) for c in cats] == [(c["id"], c["name"]) for c in COCO_CATEGORIES]


def builtin_coco_categories(root: str, panoptic_json: Optional[str] = None) -> Tuple[List[Dict], str]:
    """(categories, where they came from) of a builtin name under ``root`` whose panoptic json is
    ``panoptic_json``, in the order of the module docstring."""
    from .coco_panoptic import read_annotation_json

    side = os.path.join(root, BUILTIN_CATEGORIES_FILE)
    if os.path.isfile(side):
        info = read_annotation_json(side)
        return check_categories(info.get("categories") if isinstance(info, dict) else None, side), side
    if panoptic_json is None or not os.path.isfile(panoptic_json):
        return list(COCO_CATEGORIES), f"COCO's 133 categories ({panoptic_json} not found)"
    cats = json_categories(panoptic_json)
    if cats is None:
        logger.warning(
            "%s lists no 'categories': using COCO's 133 (add a 'categories' list or %s)",
            panoptic_json,
            side,
        )
        return list(COCO_CATEGORIES), f"COCO's 133 categories ({panoptic_json} lists none)"
    return cats, f"the 'categories' of {panoptic_json}"


class JsonCategoriesMetadata(Metadata):
    """Metadata whose :data:`CATEGORY_KEYS` are computed on first use by ``categories_fn()`` ->
    ``(categories, source)`` (e.g. :func:`builtin_coco_categories`), so that registering a name
    reads no file."""

    def __getattr__(self, key: str) -> Any:
        if key in CATEGORY_KEYS and "categories_source" not in self.__dict__:
            self._load_categories()
            return self.__dict__[key]
        return super().__getattr__(key)

    def _load_categories(self) -> None:
        from .coco_panoptic import coco_panoptic_metadata

        fn: Callable[[], Tuple[List[Dict], str]] = self.__dict__["categories_fn"]
        cats, source = fn()
        if not _same_as_coco(cats):
            logger.info("%s: %d categories from %s (not COCO's 133)", self.name, len(cats), source)
        # direct: Metadata.__setattr__ would look the key up first, and so come back here
        self.__dict__.update(coco_panoptic_metadata(cats), categories_source=source)
