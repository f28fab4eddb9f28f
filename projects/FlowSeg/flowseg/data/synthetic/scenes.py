"""Synthetic referring scenes: shapes with colours and sizes on cluttered textured backgrounds.

Every scene is built so that candidates must be *selected by meaning*: each object shares its
shape or its colour with at least one other object (a distractor), and each expression is
checked by a resolver (:func:`resolve`) to denote exactly one object of its scene. Expressions
use attributes ("the small red circle"), superlatives ("the leftmost star") and relations
("the square to the right of the purple hexagon"); reasoning queries describe the same
targets implicitly ("the shape with three corners that has the colour of a ripe banana").

Everything is deterministic given the seed (numpy ``Generator``).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 215, 35),
    "purple": (145, 55, 190),
    "orange": (245, 135, 25),
}
# object radius as a fraction of the image side
SIZES: Dict[str, Tuple[float, float]] = {"small": (0.06, 0.085), "large": (0.12, 0.16)}

# implicit descriptions for reasoning queries (ReasonSeg-style: the name is never said)
SHAPE_HINTS = {
    "circle": "the shape with no corners at all",
    "square": "the shape with four equal sides",
    "triangle": "the shape with exactly three corners",
    "star": "the shape with five sharp points",
    "hexagon": "the shape with six sides, like a honeycomb cell",
}
COLOUR_HINTS = {
    "red": "the colour of a ripe tomato",
    "green": "the colour of fresh grass",
    "blue": "the colour of a clear summer sky",
    "yellow": "the colour of a ripe banana",
    "purple": "the colour of lavender flowers",
    "orange": "the colour of a pumpkin",
}
DIRECTIONS = {  # superlative word -> (axis, sign): axis 0 = x, 1 = y; sign -1 = smallest value
    "leftmost": (0, -1),
    "rightmost": (0, 1),
    "topmost": (1, -1),
    "bottommost": (1, 1),
}
RELATIONS = {  # relation phrase -> (axis, sign): target coordinate compared with the anchor's
    "to the left of": (0, -1),
    "to the right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}


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
def _polygon(shape: str, center: Tuple[float, float], r: float, angle: float) -> Optional[np.ndarray]:
    cx, cy = center
    if shape == "circle":
        return None
    if shape == "square":
        n, radii = 4, [r * 1.1] * 4
        angle = angle + np.pi / 4
    elif shape == "triangle":
        n, radii = 3, [r * 1.25] * 3
    elif shape == "hexagon":
        n, radii = 6, [r * 1.05] * 6
    elif shape == "star":
        n, radii = 10, [r * 1.3 if i % 2 == 0 else r * 0.55 for i in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    t = angle + np.arange(n) * 2 * np.pi / n - np.pi / 2
    pts = np.stack([cx + np.asarray(radii) * np.cos(t), cy + np.asarray(radii) * np.sin(t)], axis=1)
    return np.round(pts).astype(np.int32)


def _shape_mask(shape: str, center, r: float, angle: float, size: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    poly = _polygon(shape, center, r, angle)
    if poly is None:
        cv2.circle(m, (int(round(center[0])), int(round(center[1]))), int(round(r)), 1, -1)
    else:
        cv2.fillPoly(m, [poly], 1)
    return m.astype(bool)


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


def resolve(program: Dict, objects: Sequence[SceneObject], margin: float) -> List[int]:
    """The objects an expression program denotes. ``margin`` (pixels) is how clearly one
    position must beat another for "leftmost"/"to the left of" to hold."""
    kind = program["kind"]
    if kind == "attribute":
        return [i for i, o in enumerate(objects) if _matches(o, program["attrs"])]
    if kind == "superlative":
        axis, sign = DIRECTIONS[program["direction"]]
        cands = [i for i, o in enumerate(objects) if _matches(o, program["attrs"])]
        if len(cands) < 2:
            return []  # a superlative needs something to beat
        vals = sorted(((sign * _coord(objects[i], axis), i) for i in cands), reverse=True)
        if vals[0][0] - vals[1][0] < margin:
            return []  # no clear winner: ambiguous
        return [vals[0][1]]
    if kind == "relation":
        anchors = resolve({"kind": "attribute", "attrs": program["anchor"]}, objects, margin)
        if len(anchors) != 1:
            return []
        a = objects[anchors[0]]
        axis, sign = RELATIONS[program["relation"]]
        out = []
        for i, o in enumerate(objects):
            if i == anchors[0] or not _matches(o, program["attrs"]):
                continue
            if sign * (_coord(o, axis) - _coord(a, axis)) > margin:
                out.append(i)
        return out
    raise ValueError(f"unknown expression kind {kind!r}")


def _noun_phrase(attrs: Dict[str, Optional[str]]) -> str:
    words = [attrs.get("size"), attrs.get("colour"), attrs.get("shape") or "shape"]
    return " ".join(w for w in words if w)


def render_expression(program: Dict) -> str:
    kind = program["kind"]
    if kind == "attribute":
        return "the " + _noun_phrase(program["attrs"])
    if kind == "superlative":
        return f"the {program['direction']} " + _noun_phrase(program["attrs"])
    if kind == "relation":
        target, anchor = _noun_phrase(program["attrs"]), _noun_phrase(program["anchor"])
        return f"the {target} {program['relation']} the {anchor}"
    raise ValueError(kind)


def expression_kind(text: str) -> str:
    """The kind ("attribute" / "superlative" / "relation") of an expression that
    :func:`render_expression` wrote; ValueError for text it cannot have written."""
    words = text.split()
    if len(words) < 2 or words[0] != "the":
        raise ValueError(f"not a synthetic referring expression: {text!r}")
    padded = f" {text} "
    if any(f" {phrase} the " in padded for phrase in RELATIONS):
        return "relation"
    return "superlative" if words[1] in DIRECTIONS else "attribute"


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
    idx: int, objects: List[SceneObject], rng: np.random.Generator, margin: float
) -> List[Dict]:
    obj = objects[idx]
    programs: List[Dict] = []
    for attrs in _attr_subsets(obj):
        p = {"kind": "attribute", "attrs": attrs}
        if resolve(p, objects, margin) == [idx]:
            programs.append(p)
            break  # the shortest unique description, as people say it
    for direction in rng.permutation(list(DIRECTIONS)):
        for attrs in ({"shape": obj.shape}, {"colour": obj.colour}):
            p = {"kind": "superlative", "direction": str(direction), "attrs": attrs}
            if resolve(p, objects, margin) == [idx]:
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
                if resolve({"kind": "attribute", "attrs": a}, objects, margin) == [j]
            ),
            None,
        )
        if anchor_attrs is None:
            continue
        for rel in rng.permutation(list(RELATIONS)):
            p = {
                "kind": "relation",
                "relation": str(rel),
                "attrs": {"shape": obj.shape},
                "anchor": anchor_attrs,
            }
            if resolve(p, objects, margin) == [idx]:
                programs.append(p)
                break
        if programs and programs[-1]["kind"] == "relation":
            break
    return programs


def _reasoning_for(obj: SceneObject, objects: List[SceneObject]) -> Optional[ReasoningQuery]:
    """Implicit queries; only for objects whose (shape, colour) pair is unique in the scene."""
    if sum(1 for o in objects if o.shape == obj.shape and o.colour == obj.colour) != 1:
        return None
    idx = objects.index(obj)
    short = f"{SHAPE_HINTS[obj.shape]} that has {COLOUR_HINTS[obj.colour]}"
    long = (
        f"Somewhere in this picture there is {SHAPE_HINTS[obj.shape]}, and it is painted in "
        f"{COLOUR_HINTS[obj.colour]}. Which object am I thinking of?"
    )
    return ReasoningQuery(target=idx, short=short, long=long)


# ------------------------------------------------------------------ scenes
def _sample_types(rng: np.random.Generator, n: int) -> List[Tuple[str, str, str]]:
    """Object types where every object shares its shape or colour with another one."""
    types: List[Tuple[str, str, str]] = []
    while len(types) < n:
        size = str(rng.choice(list(SIZES)))
        if not types or (len(types) == 1 and rng.random() < 0.3):
            types.append((str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), size))
            continue
        base = types[int(rng.integers(len(types)))]
        if rng.random() < 0.5:  # same shape, other colour
            types.append((base[0], str(rng.choice([c for c in COLOURS if c != base[1]])), size))
        else:  # same colour, other shape
            types.append((str(rng.choice([s for s in SHAPES if s != base[0]])), base[1], size))
    # the first object may still be alone in both attributes: give it a partner if so
    for i, t in enumerate(types):
        if not any(j != i and (u[0] == t[0] or u[1] == t[1]) for j, u in enumerate(types)):
            types.append((t[0], str(rng.choice([c for c in COLOURS if c != t[1]])), t[2]))
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
) -> Scene:
    """One scene: background, objects (later ones may occlude earlier ones), expressions."""
    n = int(rng.integers(num_objects[0], num_objects[1] + 1))
    types = _sample_types(rng, n)
    image = _background(rng, image_size)
    full_masks: List[np.ndarray] = []
    placed: List[Tuple[str, str, str, Tuple[float, float], float, float]] = []
    for shape, colour, size in types:
        for _ in range(50):
            r = rng.uniform(*SIZES[size]) * image_size
            c = (float(rng.uniform(r, image_size - r)), float(rng.uniform(r, image_size - r)))
            a = float(rng.uniform(0, 2 * np.pi))
            m = _shape_mask(shape, c, r, a, image_size)
            # occlusion is allowed, but every object must stay mostly visible
            visible_ok = min(_visible_fractions(full_masks + [m])) >= min_visible
            if visible_ok and m.sum() > 0:
                full_masks.append(m)
                placed.append((shape, colour, size, c, r, a))
                break
    objects: List[SceneObject] = []
    visible = _visible_masks(full_masks)
    for (shape, colour, size, c, r, a), fm, vm in zip(placed, full_masks, visible):
        rgb = np.asarray(COLOURS[colour], np.float32) + rng.normal(0, 6, 3)
        shade = np.clip(rgb[None, None] + rng.normal(0, 6, (image_size, image_size, 3)), 0, 255)
        image[fm] = shade[fm].astype(np.uint8)
        objects.append(SceneObject(shape, colour, size, c, r, a, vm))
    margin = 0.08 * image_size
    expressions: List[Expression] = []
    seen = set()
    for i in range(len(objects)):
        for p in _expressions_for(i, objects, rng, margin):
            text = render_expression(p)
            if text not in seen:  # unique within the scene
                seen.add(text)
                expressions.append(Expression(text=text, target=i, kind=p["kind"], program=p))
    reasoning = [q for q in (_reasoning_for(o, objects) for o in objects) if q is not None]
    return Scene(image=image, objects=objects, expressions=expressions, reasoning=reasoning)
