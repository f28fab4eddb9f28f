"""Scene vocabularies: the shapes, colours and words that the synthetic scenes are made of.

:data:`DEFAULT_VOCABULARY` is the built-in benchmark's. :data:`VARIANT_VOCABULARY` shares none of
its shapes, colours, size words, superlatives, relations or object noun: a second data set for
checking that the recipe is not tuned to the first one's words (``tools/make_variant_data.py``).
"""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, Mapping, Tuple

from .shapes import DRAWINGS

Rgb = Tuple[int, int, int]


@dataclass(frozen=True)
class SceneVocabulary:
    """What scenes are drawn with and how their expressions are worded.

    Attributes:
        name: preset name (:data:`VOCABULARIES`).
        shapes: shape word -> drawing (a :data:`.shapes.DRAWINGS` name).
        colours: colour word -> RGB.
        sizes: size word -> (min, max) object radius as a fraction of the image side.
        superlatives: template with one ``{}`` for the noun phrase -> (axis, sign); axis 0 = x,
            1 = y; sign -1 = the smallest coordinate wins ("leftmost {}" -> (0, -1)).
        relations: phrase between target and anchor -> (axis, sign): the target's coordinate
            compared with the anchor's ("to the left of" -> (0, -1)).
        noun: the word for an object whose shape is not said ("the red shape").
        shape_hints / colour_hints: implicit descriptions for reasoning queries (name never said).
        reasoning_short / reasoning_long: the queries, with ``{shape}`` and ``{colour}`` hints.
    """

    name: str
    shapes: Mapping[str, str]
    colours: Mapping[str, Rgb]
    sizes: Mapping[str, Tuple[float, float]]
    superlatives: Mapping[str, Tuple[int, int]]
    relations: Mapping[str, Tuple[int, int]]
    noun: str
    shape_hints: Mapping[str, str]
    colour_hints: Mapping[str, str]
    reasoning_short: str = "{shape} that has {colour}"
    reasoning_long: str = (
        "Somewhere in this picture there is {shape}, and it is painted in {colour}. "
        "Which object am I thinking of?"
    )

    def __post_init__(self) -> None:
        for key in ("shapes", "colours", "sizes", "superlatives", "relations", "shape_hints", "colour_hints"):
            object.__setattr__(self, key, MappingProxyType(dict(getattr(self, key))))  # read-only
        bad = [s for s, d in self.shapes.items() if d not in DRAWINGS]
        if bad:
            raise ValueError(f"vocabulary {self.name!r}: shapes {bad} have no drawing in {DRAWINGS}")
        if set(self.shape_hints) != set(self.shapes) or set(self.colour_hints) != set(self.colours):
            raise ValueError(f"vocabulary {self.name!r}: every shape and colour needs exactly one hint")
        if set(self.shapes) & set(self.colours):
            raise ValueError(f"vocabulary {self.name!r}: words both shape and colour")
        bad = [t for t in self.superlatives if t.count("{}") != 1]
        if bad:
            raise ValueError(f"vocabulary {self.name!r}: superlative templates {bad} need one '{{}}'")
        for what, table in (("superlative", self.superlatives), ("relation", self.relations)):
            if any(a not in (0, 1) or s not in (-1, 1) for a, s in table.values()):
                raise ValueError(f"vocabulary {self.name!r}: a {what} has an axis/sign outside 0/1, -1/1")

    def words(self) -> Dict[str, frozenset]:
        """Each kind of word (shape, colour, size, noun, superlative, relation) as a set of words."""

        def split(phrases):
            return frozenset(w for p in phrases for w in p.replace("{}", " ").split())

        return {
            "shape": frozenset(self.shapes),
            "colour": frozenset(self.colours),
            "size": frozenset(self.sizes),
            "noun": frozenset([self.noun]),
            "superlative": split(self.superlatives),
            "relation": split(self.relations),
        }


DEFAULT_VOCABULARY = SceneVocabulary(
    name="default",
    shapes={s: s for s in ("circle", "square", "triangle", "star", "hexagon")},
    colours={
        "red": (215, 35, 35),
        "green": (35, 160, 60),
        "blue": (35, 75, 215),
        "yellow": (235, 215, 35),
        "purple": (145, 55, 190),
        "orange": (245, 135, 25),
    },
    sizes={"small": (0.06, 0.085), "large": (0.12, 0.16)},
    superlatives={
        "leftmost {}": (0, -1),
        "rightmost {}": (0, 1),
        "topmost {}": (1, -1),
        "bottommost {}": (1, 1),
    },
    relations={"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)},
    noun="shape",
    shape_hints={
        "circle": "the shape with no corners at all",
        "square": "the shape with four equal sides",
        "triangle": "the shape with exactly three corners",
        "star": "the shape with five sharp points",
        "hexagon": "the shape with six sides, like a honeycomb cell",
    },
    colour_hints={
        "red": "the colour of a ripe tomato",
        "green": "the colour of fresh grass",
        "blue": "the colour of a clear summer sky",
        "yellow": "the colour of a ripe banana",
        "purple": "the colour of lavender flowers",
        "orange": "the colour of a pumpkin",
    },
)

VARIANT_VOCABULARY = SceneVocabulary(
    name="variant",
    shapes={s: s for s in ("diamond", "pentagon", "cross", "crescent", "heart", "arrow")},
    # far apart in hue or brightness, and none of them a grey of the background
    colours={
        "cyan": (20, 205, 225),
        "pink": (250, 115, 190),
        "brown": (125, 70, 25),
        "lime": (165, 235, 40),
        "navy": (20, 30, 120),
        "white": (248, 248, 248),
    },
    sizes={"tiny": (0.055, 0.08), "big": (0.11, 0.15)},
    superlatives={
        "{} furthest to the left": (0, -1),
        "{} furthest to the right": (0, 1),
        "highest {}": (1, -1),
        "lowest {}": (1, 1),
    },
    relations={"left of": (0, -1), "right of": (0, 1), "over": (1, -1), "under": (1, 1)},
    noun="piece",
    shape_hints={
        "diamond": "the piece shaped like a kite",
        "pentagon": "the piece with five straight edges",
        "cross": "the piece shaped like a plus sign",
        "crescent": "the piece shaped like a new moon",
        "heart": "the piece shaped like a love symbol",
        "arrow": "the piece that points in one direction",
    },
    colour_hints={
        "cyan": "the tint of a tropical lagoon",
        "pink": "the tint of candy floss",
        "brown": "the tint of chocolate",
        "lime": "the tint of an unripe citrus",
        "navy": "the tint of a sailor's uniform",
        "white": "the tint of fresh snow",
    },
    reasoning_short="{shape} in {colour}",
    reasoning_long="Find {shape}; it has {colour}. Which piece is meant?",
)

VOCABULARIES: Dict[str, SceneVocabulary] = {v.name: v for v in (DEFAULT_VOCABULARY, VARIANT_VOCABULARY)}


def get_vocabulary(name: str) -> SceneVocabulary:
    """The preset called ``name``; an unknown name is an error listing the presets."""
    if name not in VOCABULARIES:
        raise KeyError(f"unknown scene vocabulary {name!r} (presets: {sorted(VOCABULARIES)})")
    return VOCABULARIES[name]
