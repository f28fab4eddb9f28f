"""The load report: what one checkpoint load did, grouped by component and logged at the right level.

Missing and unexpected keys are listed per component with counts and example names. Absences the
stage transition or the source format explains (:mod:`.missing_keys`) are logged at INFO,
everything else at WARNING; tensors whose shapes differ are named with both shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Sequence, Set, Tuple

from torch import nn

from .components import COMPONENTS, LLM_PREFIX, NEW_COMPONENTS, component_of, group_keys_by_component

__all__ = ["LoadReport", "shape_error_message"]

try:  # fvcore's handling of tied parameters (one tensor, several names) in the missing-key list
    from fvcore.common.checkpoint import _filter_reused_missing_keys
except ImportError:  # pragma: no cover - older fvcore

    def _filter_reused_missing_keys(model: nn.Module, keys: List[str]) -> List[str]:
        return list(keys)


logger = logging.getLogger(__name__)

_EXAMPLES = 3


def _shape_hint(key: str) -> str:
    if ".class_embed." in key:
        return " - another class count (MODEL.SEM_SEG_HEAD.NUM_CLASSES): trained from scratch"
    if key.startswith(LLM_PREFIX) and ("embed_tokens" in key or "lm_head" in key):
        return " - another vocabulary size (tokenizer / added special tokens)"
    if "pos_embed" in key or "rel_pos" in key:
        return " - position table of another input size that could not be resampled"
    return ""


def _group_line(component: str, keys: Sequence[str], reason: str = "") -> str:
    examples = ", ".join(keys[:_EXAMPLES]) + (", ..." if len(keys) > _EXAMPLES else "")
    line = f"  {COMPONENTS[component]}: {len(keys)} key{'s' if len(keys) != 1 else ''} ({examples})"
    return f"{line}\n      -> {reason}" if reason else line


@dataclass
class LoadReport:
    """What one :meth:`FlowSegCheckpointer.load` did, grouped by component (see :data:`COMPONENTS`).

    ``missing_expected`` / ``missing_unexpected``: model keys the checkpoint did not provide, split by
    whether the stage transition / source format explains them (``missing_reasons`` says how);
    ``unexpected``: checkpoint keys the model has no use for; ``dropped``: checkpoint keys removed on
    purpose (``dropped_reasons``); ``incorrect_shapes``: (key, checkpoint shape, model shape) skipped;
    ``notes``: renames, row transfers, resampling; ``converted``: (X-SAM checkpoints) model keys
    renamed from the source format, by component.
    """

    source: str = ""
    source_format: str = "flowseg"
    num_loaded: int = 0
    num_model_keys: int = 0
    missing_expected: Dict[str, List[str]] = field(default_factory=dict)
    missing_unexpected: Dict[str, List[str]] = field(default_factory=dict)
    missing_reasons: Dict[str, str] = field(default_factory=dict)
    unexpected: Dict[str, List[str]] = field(default_factory=dict)
    dropped: Dict[str, List[str]] = field(default_factory=dict)
    dropped_reasons: Dict[str, str] = field(default_factory=dict)
    incorrect_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    converted: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def newly_initialised(self) -> Dict[str, List[str]]:
        """FlowSeg's own modules that the source format has no weights for (BSF, BAR), by component."""
        return {c: v for c, v in self.missing_expected.items() if c in NEW_COMPONENTS}

    @property
    def missing(self) -> Dict[str, List[str]]:
        """All missing keys by component (expected and not)."""
        keys = [k for g in (self.missing_expected, self.missing_unexpected) for v in g.values() for k in v]
        return group_keys_by_component(keys)

    @property
    def clean(self) -> bool:
        """True when nothing needs a WARNING (no unexplained missing/unexpected key, no shape skip)."""
        return not (self.missing_unexpected or self.unexpected or self.incorrect_shapes)

    def record_load(
        self,
        incompatible: Any,
        state_dict: Mapping[str, Any],
        model: nn.Module,
        reason_of: Callable[[str, str], str],
    ) -> List[str]:
        """Fill the report from fvcore's incompatible keys after ``state_dict`` was loaded into
        ``model``; returns the keys that were loaded.

        A missing key is expected when ``reason_of(component, key)`` gives a reason (the first per
        component is kept). Tensors of another shape are reported as such, not as missing too.
        """
        shape_skipped = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [
            k for k in _filter_reused_missing_keys(model, incompatible.missing_keys) if k not in shape_skipped
        ]
        expected: Set[str] = set()
        for key in missing:
            component = component_of(key)
            reason = reason_of(component, key)
            if reason:
                expected.add(key)
                self.missing_reasons.setdefault(component, reason)
        self.missing_expected = group_keys_by_component(k for k in missing if k in expected)
        self.missing_unexpected = group_keys_by_component(k for k in missing if k not in expected)
        self.unexpected = group_keys_by_component(incompatible.unexpected_keys)
        self.incorrect_shapes = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
        unused = set(incompatible.unexpected_keys) | shape_skipped
        loaded = [k for k in state_dict if k not in unused]
        self.num_loaded = len(loaded)
        return loaded

    def expected_absent_line(self) -> str:
        """One line: per component, how many tensors the checkpoint lacks and where they come from."""
        parts = []
        for c, keys in self.missing_expected.items():
            reason = self.missing_reasons.get(c, "")
            parts.append(f"{COMPONENTS[c]} {len(keys)}" + (f" ({reason})" if reason else ""))
        return "Not in the checkpoint, as expected: " + "; ".join(parts) + "."

    def explain_missing(self, keys: Set[str], reason: str) -> None:
        """Move the unexplained missing ``keys`` to the expected ones, with ``reason``."""
        for c in list(self.missing_unexpected):
            moved = [k for k in self.missing_unexpected[c] if k in keys]
            if not moved:
                continue
            self.missing_expected.setdefault(c, []).extend(moved)
            self.missing_reasons.setdefault(c, reason)
            rest = [k for k in self.missing_unexpected[c] if k not in keys]
            if rest:
                self.missing_unexpected[c] = rest
            else:
                del self.missing_unexpected[c]

    def info_text(self) -> str:
        lines = [
            f"Loaded {self.num_loaded} of {self.num_model_keys} model tensors from {self.source or 'checkpoint'}"
            f" (format: {self.source_format})."
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.converted:
            lines.append(f"Converted from the {self.source_format} names:")
            lines += [_group_line(c, v) for c, v in self.converted.items()]
        if self.missing_expected:
            lines.append(self.expected_absent_line())
        if self.dropped:
            lines.append("Checkpoint tensors dropped on purpose:")
            lines += [_group_line(c, v, self.dropped_reasons.get(c, "")) for c, v in self.dropped.items()]
        return "\n".join(lines)

    def warning_text(self) -> str:
        lines: List[str] = []
        if self.incorrect_shapes:
            lines.append(
                "Skipped tensors whose shape differs from the model's (they keep their initialisation):"
            )
            lines += [
                f"  {k}: checkpoint {tuple(a)} vs model {tuple(b)} [{COMPONENTS[component_of(k)]}]{_shape_hint(k)}"
                for k, a, b in self.incorrect_shapes
            ]
        if self.missing_unexpected:
            lines.append("Model tensors NOT found in the checkpoint (left at their initialisation):")
            lines += [_group_line(c, v) for c, v in self.missing_unexpected.items()]
        if self.unexpected:
            lines.append("Checkpoint tensors the model does not use:")
            lines += [_group_line(c, v) for c, v in self.unexpected.items()]
        return "\n".join(lines)

    def log(self, log: logging.Logger = logger) -> None:
        log.info(self.info_text())
        warning = self.warning_text()
        if warning:
            log.warning(f"{self.source or 'checkpoint'}:\n{warning}")


def shape_error_message(report: LoadReport) -> str:
    """Why a FlowSeg checkpoint whose tensors do not fit the model is refused, and what to do."""
    shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in report.incorrect_shapes[:5])
    return (
        f"{report.source}: {len(report.incorrect_shapes)} tensors have other shapes than the model's "
        f"(a checkpoint of another config?), e.g. {shown}. Loading it would leave them randomly "
        "initialised. Use the config the checkpoint was trained with, or set "
        "MODEL.WEIGHTS_PARTIAL_LOAD True to load only the tensors whose shapes match."
    )
