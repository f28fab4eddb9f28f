"""Synthetic referring scenes: shapes with colours and sizes on cluttered textured backgrounds.

Every scene is built so that candidates must be *selected by meaning*: each object shares its
shape or its colour with at least one other object (a distractor), and each expression is
checked by a resolver (:func:`resolve`) to denote exactly one object of its scene. Expressions
use attributes ("the small red circle"), superlatives ("the leftmost star") and relations
("the square to the right of the purple hexagon"); reasoning queries describe the same
targets implicitly ("the shape with three corners that has the colour of a ripe banana").

The shapes, colours and words come from a :class:`~.vocabulary.SceneVocabulary`
(``vocabulary=``, default :data:`~.vocabulary.DEFAULT_VOCABULARY`, the examples above).
Everything is deterministic given the seed (numpy ``Generator``).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .shapes import shape_mask
from .vocabulary import DEFAULT_VOCABULARY, SceneVocabulary

# The default vocabulary's tables, under the names the rest of the package imports.
SHAPES: Tuple[str, ...] = tuple(DEFAULT_VOCABULARY.shapes)
COLOURS = DEFAULT_VOCABULARY.colours
SIZES = DEFAULT_VOCABULARY.sizes


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    center: Tuple[float, float]  # (x, y) in pixels
    radius: float
    angle: float
    mask: np.ndarray = field(repr=False)  # visible part, HxW bool

    def attrs(self) -> Dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size}


@dataclass
class Expression:
    text: str
    target: int
    kind: str  # "attribute" | "superlative" | "relation"
    program: Dict


@dataclass
class ReasoningQuery:
    target: int
    short: str
    long: str


@dataclass
class Scene:
    image: np.ndarray  # HxWx3 uint8 RGB
    objects: List[SceneObject]
    expressions: List[Expression]
    reasoning: List[ReasoningQuery]


# ------------------------------------------------------------------ rendering
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted low-frequency texture plus clutter strokes, so that objects are not the only edges."""
    base = rng.uniform(100, 160) + rng.uniform(-12, 12, size=3)  # greyish with a slight tint
    low = rng.normal(0, 22, size=(6, 6, 1)).astype(np.float32)
    tex = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]
    img = np.clip(base[None, None] + tex + rng.normal(0, 7, (size, size, 3)), 0, 255)
    img = img.astype(np.uint8)
    for _ in range(int(rng.integers(4, 9))):  # grey clutter lines and blobs
        g = int(rng.integers(60, 200))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(img, p1, p2, (g, g, g), int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(2, 5))):
        g = int(rng.integers(60, 200))
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.ellipse(img, c, tuple(int(v) for v in rng.integers(2, size // 12, 2)), 0, 0, 360, (g, g, g), -1)
    return img


# ------------------------------------------------------------------ semantics
def _matches(obj: SceneObject, attrs: Dict[str, Optional[str]]) -> bool:
    return all(v is None or getattr(obj, k) == v for k, v in attrs.items())


def _coord(obj: SceneObject, axis: int) -> float:
    return obj.center[axis]


def resolve(
    program: Dict,
    objects: Sequence[SceneObject],
    margin: float,
    vocabulary: SceneVocabulary = DEFAULT_VOCABULARY,
) -> List[int]:
    """The objects an expression program denotes. ``margin`` (pixels) is how clearly one
    position must beat another for "leftmost"/"to the left of" to hold."""
    kind = program["kind"]
    if kind == "attribute":
        return [i for i, o in enumerate(objects) if _matches(o, program["attrs"])]
    if kind == "superlative":
        axis, sign = vocabulary.superlatives[program["direction"]]
        cands = [i for i, o in enumerate(objects) if _matches(o, program["attrs"])]
        if len(cands) < 2:
            return []  # a superlative needs something to beat
        vals = sorted(((sign * _coord(objects[i], axis), i) for i in cands), reverse=True)
        if vals[0][0] - vals[1][0] < margin:
            return []  # no clear winner: ambiguous
        return [vals[0][1]]
    if kind == "relation":
        anchors = resolve({"kind": "attribute", "attrs": program["anchor"]}, objects, margin, vocabulary)
        if len(anchors) != 1:
            return []
        a = objects[anchors[0]]
        axis, sign = vocabulary.relations[program["relation"]]
        out = []
        for i, o in enumerate(objects):
            if i == anchors[0] or not _matches(o, program["attrs"]):
                continue
            if sign * (_coord(o, axis) - _coord(a, axis)) > margin:
                out.append(i)
        return out
    raise ValueError(f"unknown expression kind {kind!r}")


def _noun_phrase(attrs: Dict[str, Optional[str]], noun: str) -> str:
    words = [attrs.get("size"), attrs.get("colour"), attrs.get("shape") or noun]
    return " ".join(w for w in words if w)


def render_expression(program: Dict, vocabulary: SceneVocabulary = DEFAULT_VOCABULARY) -> str:
    kind, noun = program["kind"], vocabulary.noun
    if kind == "attribute":
        return "the " + _noun_phrase(program["attrs"], noun)
    if kind == "superlative":
        return "the " + program["direction"].format(_noun_phrase(program["attrs"], noun))
    if kind == "relation":
        target, anchor = _noun_phrase(program["attrs"], noun), _noun_phrase(program["anchor"], noun)
        return f"the {target} {program['relation']} the {anchor}"
    raise ValueError(kind)


def expression_kind(text: str, vocabulary: SceneVocabulary = DEFAULT_VOCABULARY) -> str:
    """The kind ("attribute" / "superlative" / "relation") of an expression that
    :func:`render_expression` wrote with ``vocabulary``; ValueError for text it cannot have written."""
    words = text.split()
    if len(words) < 2 or words[0] != "the":
        raise ValueError(f"not a synthetic referring expression: {text!r}")
    padded = f" {text} "
    if any(f" {phrase} the " in padded for phrase in vocabulary.relations):
        return "relation"
    for template in vocabulary.superlatives:
        before, after = template.split("{}")
        if text.startswith("the " + before) and text.endswith(after):
            return "superlative"
    return "attribute"


def _attr_subsets(obj: SceneObject) -> List[Dict[str, Optional[str]]]:
    """Attribute descriptions from the shortest up; shape-less ones read "the red shape"."""
    s, c, z = obj.shape, obj.colour, obj.size
    return [
        {"shape": s, "colour": None, "size": None},
        {"shape": None, "colour": c, "size": None},
        {"shape": s, "colour": c, "size": None},
        {"shape": s, "colour": None, "size": z},
        {"shape": None, "colour": c, "size": z},
        {"shape": s, "colour": c, "size": z},
    ]


def _expressions_for(
    idx: int, objects: List[SceneObject], rng: np.random.Generator, margin: float, vocabulary: SceneVocabulary
) -> List[Dict]:
    obj = objects[idx]
    programs: List[Dict] = []
    for attrs in _attr_subsets(obj):
        p = {"kind": "attribute", "attrs": attrs}
        if resolve(p, objects, margin, vocabulary) == [idx]:
            programs.append(p)
            break  # the shortest unique description, as people say it
    for direction in rng.permutation(list(vocabulary.superlatives)):
        for attrs in ({"shape": obj.shape}, {"colour": obj.colour}):
            p = {"kind": "superlative", "direction": str(direction), "attrs": attrs}
            if resolve(p, objects, margin, vocabulary) == [idx]:
                programs.append(p)
                break
        if len(programs) and programs[-1]["kind"] == "superlative":
            break
    others = [j for j in rng.permutation(len(objects)) if j != idx]
    for j in others:
        anchor_attrs = next(
            (
                a
                for a in _attr_subsets(objects[j])
                if resolve({"kind": "attribute", "attrs": a}, objects, margin, vocabulary) == [j]
            ),
            None,
        )
        if anchor_attrs is None:
            continue
        for rel in rng.permutation(list(vocabulary.relations)):
            p = {
                "kind": "relation",
                "relation": str(rel),
                "attrs": {"shape": obj.shape},
                "anchor": anchor_attrs,
            }
            if resolve(p, objects, margin, vocabulary) == [idx]:
                programs.append(p)
                break
        if programs and programs[-1]["kind"] == "relation":
            break
    return programs


def _reasoning_for(
    obj: SceneObject, objects: List[SceneObject], vocabulary: SceneVocabulary
) -> Optional[ReasoningQuery]:
    """Implicit queries; only for objects whose (shape, colour) pair is unique in the scene."""
    if sum(1 for o in objects if o.shape == obj.shape and o.colour == obj.colour) != 1:
        return None
    idx = objects.index(obj)
    hints = {"shape": vocabulary.shape_hints[obj.shape], "colour": vocabulary.colour_hints[obj.colour]}
    short = vocabulary.reasoning_short.format(**hints)
    long = vocabulary.reasoning_long.format(**hints)
    return ReasoningQuery(target=idx, short=short, long=long)


# ------------------------------------------------------------------ scenes
def _sample_types(
    rng: np.random.Generator, n: int, vocabulary: SceneVocabulary
) -> List[Tuple[str, str, str]]:
    """Object types where every object shares its shape or colour with another one."""
    shapes, colours = tuple(vocabulary.shapes), list(vocabulary.colours)
    types: List[Tuple[str, str, str]] = []
    while len(types) < n:
        size = str(rng.choice(list(vocabulary.sizes)))
        if not types or (len(types) == 1 and rng.random() < 0.3):
            types.append((str(rng.choice(shapes)), str(rng.choice(colours)), size))
            continue
        base = types[int(rng.integers(len(types)))]
        if rng.random() < 0.5:  # same shape, other colour
            types.append((base[0], str(rng.choice([c for c in colours if c != base[1]])), size))
        else:  # same colour, other shape
            types.append((str(rng.choice([s for s in shapes if s != base[0]])), base[1], size))
    # the first object may still be alone in both attributes: give it a partner if so
    for i, t in enumerate(types):
        if not any(j != i and (u[0] == t[0] or u[1] == t[1]) for j, u in enumerate(types)):
            types.append((t[0], str(rng.choice([c for c in colours if c != t[1]])), t[2]))
    return types


def _visible_masks(full_masks: List[np.ndarray]) -> List[np.ndarray]:
    """Objects are painted in order: an object's visible part is what later ones leave."""
    out: List[np.ndarray] = []
    occluder = np.zeros_like(full_masks[0]) if full_masks else None
    for fm in reversed(full_masks):
        out.append(fm & ~occluder)
        occluder = occluder | fm
    return out[::-1]


def _visible_fractions(full_masks: List[np.ndarray]) -> List[float]:
    return [v.sum() / max(f.sum(), 1) for v, f in zip(_visible_masks(full_masks), full_masks)]


def generate_scene(
    rng: np.random.Generator,
    image_size: int = 128,
    num_objects: Tuple[int, int] = (3, 6),
    min_visible: float = 0.6,
    vocabulary: SceneVocabulary = DEFAULT_VOCABULARY,
) -> Scene:
    """One scene: background, objects (later ones may occlude earlier ones), expressions."""
    n = int(rng.integers(num_objects[0], num_objects[1] + 1))
    types = _sample_types(rng, n, vocabulary)
    image = _background(rng, image_size)
    full_masks: List[np.ndarray] = []
    placed: List[Tuple[str, str, str, Tuple[float, float], float, float]] = []
    for shape, colour, size in types:
        for _ in range(50):
            r = rng.uniform(*vocabulary.sizes[size]) * image_size
            c = (float(rng.uniform(r, image_size - r)), float(rng.uniform(r, image_size - r)))
            a = float(rng.uniform(0, 2 * np.pi))
            m = shape_mask(vocabulary.shapes[shape], c, r, a, image_size)
            # occlusion is allowed, but every object must stay mostly visible
            visible_ok = min(_visible_fractions(full_masks + [m])) >= min_visible
            if visible_ok and m.sum() > 0:
                full_masks.append(m)
                placed.append((shape, colour, size, c, r, a))
                break
    objects: List[SceneObject] = []
    visible = _visible_masks(full_masks)
    for (shape, colour, size, c, r, a), fm, vm in zip(placed, full_masks, visible):
        rgb = np.asarray(vocabulary.colours[colour], np.float32) + rng.normal(0, 6, 3)
        shade = np.clip(rgb[None, None] + rng.normal(0, 6, (image_size, image_size, 3)), 0, 255)
        image[fm] = shade[fm].astype(np.uint8)
        objects.append(SceneObject(shape, colour, size, c, r, a, vm))
    margin = 0.08 * image_size
    expressions: List[Expression] = []
    seen = set()
    for i in range(len(objects)):
        for p in _expressions_for(i, objects, rng, margin, vocabulary):
            text = render_expression(p, vocabulary)
            if text not in seen:  # unique within the scene
                seen.add(text)
                expressions.append(Expression(text=text, target=i, kind=p["kind"], program=p))
    reasoning = [q for q in (_reasoning_for(o, objects, vocabulary) for o in objects) if q is not None]
    return Scene(image=image, objects=objects, expressions=expressions, reasoning=reasoning)
