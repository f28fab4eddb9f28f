"""Trainable-only checkpoints: what training changed, plus where the frozen weights come from.

With Qwen3-4B and SigLIP2 frozen (or LoRA-adapted) a full state dict is ~10 GB that never changes;
a periodic checkpoint written every ``SOLVER.CHECKPOINT_PERIOD`` iterations need not repeat it.
With ``SOLVER.CHECKPOINT_TRAINABLE_ONLY`` (default on) :class:`~.checkpointer.FlowSegCheckpointer`
saves

* every parameter that trains (``requires_grad``: LoRA, the new-token rows, projectors, segmentor,
  BSF, BAR, ...) and every buffer,
* every frozen parameter that has no file to come back from (e.g. a frozen LLM built from a config
  json with random weights), and
* under :data:`MANIFEST_KEY`, a manifest of the frozen parameters it leaves out: per source (the
  checkpoint the run was started or resumed from, ``MODEL.LLM.PATH``,
  ``MODEL.VANILLA_ENCODER.PATH``, ``MODEL.SAM_VIT.CHECKPOINT``) the key names and a fingerprint.

Loading such a file (``--resume``, ``--eval-only``, ``MODEL.WEIGHTS`` of a later stage, the demo)
goes through the same ``FlowSegCheckpointer.load``: the model is built from the config as usual
(the LLM and the vision tower from their folders, SAM from its checkpoint), the base checkpoint it
names is loaded first (recursively, if that is a trainable-only file too: this replays how the
run's model was made), the fingerprints of the left-out tensors are compared with the model's (a
clear error names the source that changed), then the saved tensors are loaded on top.
``tools/export_full_checkpoint.py`` writes the self-contained (full) state dict of any checkpoint.

A fingerprint is a SHA-256 over each tensor's name, dtype, shape and an evenly strided sample of
at most :data:`SAMPLE` of its values: cheap at 4B parameters, and different pretrained weights
differ in every sample.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .components import component_of

if TYPE_CHECKING:  # pragma: no cover
    from .checkpointer import FlowSegCheckpointer

__all__ = [
    "MANIFEST_KEY",
    "FORMAT",
    "FrozenBaseMismatchError",
    "is_trainable_only",
    "tensor_fingerprint",
    "frozen_sources",
    "build_time_source",
    "outside_run",
    "trainable_state_dict",
    "checkpoint_bytes",
]

logger = logging.getLogger(__name__)

MANIFEST_KEY = "flowseg_frozen_base"
FORMAT = "flowseg-trainable-only-v1"
SAMPLE = 4096

#: component -> (config key, how the model builder reads it) of frozen weights loaded at build time
_BUILD_SOURCES = {
    "condition_head.llm_base": "MODEL.LLM.PATH",
    "condition_head.vision_tower": "MODEL.VANILLA_ENCODER.PATH",
    "segmentation_encoder": "MODEL.SAM_VIT.CHECKPOINT",
}
_CHECKPOINT = "checkpoint"


class FrozenBaseMismatchError(RuntimeError):
    """The frozen weights a trainable-only checkpoint was saved against differ from the model's."""


def is_trainable_only(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint dict is a trainable-only one (it carries a manifest)."""
    manifest = checkpoint.get(MANIFEST_KEY) if isinstance(checkpoint, Mapping) else None
    return isinstance(manifest, Mapping) and manifest.get("format") == FORMAT


def tensor_fingerprint(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """SHA-256 (hex) of the named tensors: name, dtype, shape and a strided value sample each."""
    h = hashlib.sha256()
    for key in sorted(keys):
        t = state[key].detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // SAMPLE)
            h.update(flat[::step][:SAMPLE].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def _source_values(cfg: Any) -> Dict[str, str]:
    """The build-time weight sources a config names (``{config key: path}``, set ones only)."""
    if cfg is None:
        return {}
    values = {
        "MODEL.LLM.PATH": cfg.MODEL.LLM.PATH,
        "MODEL.VANILLA_ENCODER.PATH": cfg.MODEL.VANILLA_ENCODER.PATH
        if cfg.MODEL.VANILLA_ENCODER.ENABLED
        else "",
        "MODEL.SAM_VIT.CHECKPOINT": cfg.MODEL.SAM_VIT.CHECKPOINT,
    }
    return {k: os.path.abspath(v) for k, v in values.items() if v}


def build_time_source(component: str, cfg: Any) -> str:
    """The config key that gives ``component`` pretrained weights when the model is built
    (e.g. ``MODEL.LLM.PATH`` for the LLM base), if ``cfg`` sets it; "" otherwise."""
    key = _BUILD_SOURCES.get(component, "")
    return key if key in _source_values(cfg) else ""


def frozen_sources(
    model: nn.Module,
    cfg: Any,
    loaded: Optional[Mapping[str, Any]] = None,
) -> Tuple[Dict[str, List[str]], List[str], Optional[str]]:
    """Sort the frozen parameters of ``model`` by where they come back from.

    ``loaded`` describes the checkpoint loaded into the model (:func:`note_loaded`): ``file``, its
    ``base`` and ``own_keys`` (tensors the file itself holds). Returns (``{source: keys}`` of the
    tensors that can be left out, the frozen keys that must be saved, the base checkpoint or None).
    Sources: ``"checkpoint"`` (the base checkpoint, loaded first) or a config key of
    :data:`_BUILD_SOURCES`. A tensor the base checkpoint set wins over the build-time file it
    replaced, as it did in the run.
    """
    build = _source_values(cfg)
    loaded = loaded or {}
    own, restored = set(loaded.get("own_keys", ())), set(loaded.get("restored_keys", ()))
    groups: Dict[str, List[str]] = OrderedDict()
    keep: List[str] = []
    needs_file = needs_base = False
    for name, p in model.named_parameters(remove_duplicate=True):
        if p.requires_grad:
            continue
        if name in own:
            source, needs_file = _CHECKPOINT, True
        elif name in restored and loaded.get("base"):
            source, needs_base = _CHECKPOINT, True
        else:
            key = _BUILD_SOURCES.get(component_of(name))
            source = key if key in build else None
        if source is None:
            keep.append(name)
        else:
            groups.setdefault(source, []).append(name)
    base = loaded.get("file") if needs_file else (loaded.get("base") if needs_base else None)
    return groups, keep, base


def trainable_state_dict(
    model: nn.Module, cfg: Any, loaded: Optional[Mapping[str, Any]] = None
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict without the frozen tensors that have a source, manifest) of ``model``."""
    full = model.state_dict()
    groups, keep, base = frozen_sources(model, cfg, loaded)
    left_out = {k for keys in groups.values() for k in keys}
    # tied / shared parameters appear under several state-dict names: leave out every alias
    ptr_left = {full[k].data_ptr() for k in left_out}
    state = OrderedDict(
        (k, v) for k, v in full.items() if k not in left_out and not (v.numel() and v.data_ptr() in ptr_left)
    )
    aliases = [k for k in full if k not in state and k not in left_out]
    build = _source_values(cfg)
    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "base_checkpoint": base,
        "sources": {
            src: {
                "path": base if src == _CHECKPOINT else build[src],
                "keys": sorted(keys),
                "fingerprint": tensor_fingerprint(full, keys),
            }
            for src, keys in groups.items()
        },
        "aliases": aliases,
        "num_saved": len(state),
        "num_left_out": len(left_out) + len(aliases),
    }
    return state, manifest


def _check_fingerprints(
    model_state: Mapping[str, torch.Tensor], manifest: Mapping[str, Any], src_file: str
) -> None:
    for source, entry in manifest["sources"].items():
        missing = [k for k in entry["keys"] if k not in model_state]
        if missing:
            raise FrozenBaseMismatchError(
                f"{src_file}: the model has no {missing[:3]} ({len(missing)} frozen tensors recorded "
                f"from {source} {entry['path']}): it was built from another config"
            )
        if tensor_fingerprint(model_state, entry["keys"]) != entry["fingerprint"]:
            what = "base checkpoint" if source == _CHECKPOINT else source
            raise FrozenBaseMismatchError(
                f"{src_file} was trained against frozen weights from {what} {entry['path']}, but the "
                f"model's {len(entry['keys'])} frozen tensors from there (e.g. {entry['keys'][0]}) differ: "
                "point the config at the same files (or export a full checkpoint with "
                "tools/export_full_checkpoint.py where the original files are available)"
            )


def restore_frozen_base(
    checkpointer: FlowSegCheckpointer, checkpoint: Dict[str, Any]
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """For a trainable-only ``checkpoint``: load its base checkpoint into the model, check the
    left-out tensors' fingerprints and return the checkpoint with them filled in from the model
    (so that the ordinary load sees a complete state dict). Other checkpoints pass unchanged.
    Also returns what :func:`note_loaded_checkpoint` needs once the load is done."""
    src_file = os.path.abspath(checkpointer.source) if checkpointer.source else ""
    if not is_trainable_only(checkpoint):
        return checkpoint, {"file": src_file}
    manifest = checkpoint[MANIFEST_KEY]
    base = manifest.get("base_checkpoint")
    if base:
        if not os.path.isfile(base):
            raise FileNotFoundError(
                f"{src_file} holds only trained tensors; its frozen ones come from the base checkpoint "
                f"{base}, which does not exist (restore it, or load a full export of {src_file})"
            )
        logger.info("%s is trainable-only: loading its base checkpoint %s first", src_file, base)
        checkpointer.load_weights(base)
        if checkpointer.last_report is not None:
            # what the base lacks but the file itself holds, or the build loaded, is no problem
            report = checkpointer.last_report
            report.explain_missing(set(checkpoint["model"]), f"saved in {os.path.basename(src_file)}")
            for source, entry in manifest["sources"].items():
                if source != _CHECKPOINT:
                    report.explain_missing(set(entry["keys"]), f"loaded from {source}")
            report.log(logger)
    model_state = checkpointer.model.state_dict()
    _check_fingerprints(model_state, manifest, src_file)
    left_out = [k for e in manifest["sources"].values() for k in e["keys"]] + list(
        manifest.get("aliases", [])
    )
    own = list(checkpoint["model"])
    merged = OrderedDict((k, model_state[k]) for k in left_out if k in model_state)
    merged.update(checkpoint["model"])
    logger.info(
        "%s: %d saved tensors + %d frozen tensors from %s (fingerprints match)",
        src_file,
        len(own),
        len(left_out),
        ", ".join(f"{s} {e['path']}" for s, e in manifest["sources"].items()) or "nowhere",
    )
    info = {"file": src_file, "own_keys": own, "restored_keys": left_out, "base": base}
    return dict(checkpoint, model=merged), info


_LOADED_ATTR = "_flowseg_loaded_checkpoint"


def note_loaded_checkpoint(model: nn.Module, pending: Mapping[str, Any], loaded_keys: Iterable[str]) -> None:
    """Remember on ``model`` what a finished load put into it, for the next trainable-only save
    (whichever checkpointer writes it): a full file provided every tensor it loaded
    (``own_keys``); a trainable-only one its saved tensors, the rest (``restored_keys``) coming
    from its ``base``."""
    info = dict(pending)
    loaded = set(loaded_keys)
    if "own_keys" in info:
        info["own_keys"] = [k for k in info["own_keys"] if k in loaded]
    else:
        info["own_keys"] = sorted(loaded)
    setattr(model, _LOADED_ATTR, info)  # a plain attribute: not part of the state dict


def outside_run(loaded: Mapping[str, Any], save_dir: str) -> Dict[str, Any]:
    """``loaded`` as a save into ``save_dir`` may use it: a checkpoint of the run itself (what
    ``--resume`` loads) can be deleted or overwritten later, so the frozen tensors it held are
    saved again instead of referenced; those it restored from its own base keep that base. A
    resumed run thus writes the checkpoints an uninterrupted one writes."""
    info = dict(loaded)
    src = info.get("file")
    run = os.path.abspath(save_dir)
    if src and os.path.dirname(os.path.abspath(src)) == run:
        info["own_keys"] = []
    return info


def loaded_checkpoint_info(model: nn.Module) -> Dict[str, Any]:
    """What :func:`note_loaded_checkpoint` recorded for ``model`` (``{}`` if nothing was loaded)."""
    model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    return dict(getattr(model, _LOADED_ATTR, {}))


def checkpoint_bytes(
    model: nn.Module, cfg: Any, loaded: Optional[Mapping[str, Any]] = None
) -> Dict[str, int]:
    """Bytes of the model tensors in a full vs a trainable-only checkpoint, and of AdamW's two
    moments (fp32) of the trainable parameters, which training checkpoints add to both. Shapes and
    dtypes only: works on the meta device. Tied weights count once, as ``torch.save`` stores them."""
    groups, _, _ = frozen_sources(model, cfg, loaded)
    left_out = {k for keys in groups.values() for k in keys}
    params = dict(model.named_parameters(remove_duplicate=True))
    all_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in all_names}
    full = kept = optim = 0
    for name, t in list(params.items()) + list(buffers.items()):
        n = t.numel() * t.element_size()
        full += n
        kept += 0 if name in left_out else n
        if name in params and t.requires_grad:
            optim += 2 * 4 * t.numel()
    return {"full": full, "trainable_only": kept, "optimizer": optim}
