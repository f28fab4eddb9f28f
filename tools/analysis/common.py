"""Shared pieces of the analysis tools in ``tools/analysis``.

* config + model: :func:`setup_cfg` (``--config-file``, ``--weights``, ``--opts KEY VALUE ...``)
  and :func:`load_model` (``build_model`` + ``FlowSegCheckpointer``, eval mode), both on top of
  :mod:`flowseg.utils.inference`;
* data: :func:`iterate_dataset` runs a registered data set through the project's test mapper
  (the same inputs ``train_net.py --eval-only`` feeds the model), optionally only the first
  ``max_samples`` samples, and :func:`batched` groups them; :func:`model_and_dataset_from_args`
  is the config, model and samples of a model tool's command line;
* :func:`run_head_with_intermediates`: the decoder outputs with the BSF intermediates
  (gates, conditions C(0)..C(L), attention weights);
* per-sample result files: :func:`load_per_expression` reads the ``per_expression.json`` that
  ``ReferringEvaluator`` writes, :func:`resolve_per_expression` finds it in an output folder;
* metrics: :func:`pct`, :func:`region_metrics` (cIoU / gIoU of per-sample records, percent);
* output: :func:`write_json`, :func:`write_text`, :func:`write_report`, :func:`markdown_table`.

The tools are importable as modules (``sys.path`` gets ``tools/analysis``) and runnable as
scripts; both find the ``flowseg`` package without installing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROJECT = os.path.join(ROOT, "projects", "FlowSeg")
if _PROJECT not in sys.path:
    # Scripts run from a checkout without `pip install -e .` still find the package.
    sys.path.insert(0, _PROJECT)

import torch  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402
from flowseg.data.build import build_test_mapper  # noqa: E402
from flowseg.data.synthetic.scenes import expression_kind  # noqa: E402
from flowseg.evaluation.metrics import cumulative_iou, mean_iou  # noqa: E402
from flowseg.utils import inference  # noqa: E402

__all__ = [
    "ROOT",
    "add_model_args",
    "setup_cfg",
    "check_weights",
    "require_referring",
    "load_model",
    "model_from_args",
    "model_and_dataset_from_args",
    "default_dataset",
    "iterate_dataset",
    "batched",
    "run_head_with_intermediates",
    "load_per_expression",
    "resolve_per_expression",
    "pct",
    "region_metrics",
    "group_by_synthetic_kind",
    "write_json",
    "write_text",
    "write_report",
    "markdown_table",
    "fmt",
    "setup_logging",
]

logger = logging.getLogger("flowseg.analysis")

# Fields every per_expression.json record must have for the region metrics.
_REQUIRED_RECORD_FIELDS = ("intersection", "union", "iou")


# ---------------------------------------------------------------------------------------- cfg / model
def add_model_args(parser: argparse.ArgumentParser, dataset: bool = True) -> argparse.ArgumentParser:
    """``--config-file``, ``--weights``, (``--dataset``, ``--max-samples``), ``--opts KEY VALUE ...``."""
    parser.add_argument("--config-file", required=True, metavar="FILE", help="FlowSeg yaml config")
    parser.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="checkpoint (sets MODEL.WEIGHTS; default: the config's)",
    )
    if dataset:
        parser.add_argument(
            "--dataset",
            default=None,
            help="registered data set name (default: the config's DATASETS.TEST[0])",
        )
        parser.add_argument(
            "--max-samples", type=int, default=None, help="only the first N samples (default: all)"
        )
    inference.add_opts_argument(parser)
    return parser


def setup_cfg(config_file: str, weights: Optional[str] = None, opts: Sequence[Any] = ()) -> CfgNode:
    """Detectron2 config with FlowSeg's keys, ``config_file`` merged, then ``opts``, then ``weights``;
    frozen (:func:`flowseg.utils.inference.build_cfg`)."""
    cfg = inference.build_cfg(config_file, weights, opts)
    cfg.freeze()
    return cfg


def check_weights(path: str) -> None:
    """Fail early (naming the file) when a local checkpoint path does not exist.

    URLs and Detectron2 ``scheme://`` paths are left to ``PathManager``.
    """
    if not path:
        return
    if "://" in path:
        if not PathManager.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path} (MODEL.WEIGHTS)")
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path} (MODEL.WEIGHTS)")


def require_referring(cfg: CfgNode, config_file: str = "") -> None:
    """The referring tools need ``MODEL.FLOWSEG.MODE 'referring'`` (a language model, <p> conditions)."""
    mode = cfg.MODEL.FLOWSEG.MODE
    if mode != "referring":
        where = f" ({config_file})" if config_file else ""
        raise ValueError(
            f"the model config{where} is not in referring mode: MODEL.FLOWSEG.MODE is {mode!r}, "
            "expected 'referring' (use a referring config, e.g. configs/flowseg_refcoco.yaml)"
        )


def load_model(cfg: CfgNode) -> torch.nn.Module:
    """``build_model(cfg)`` with ``cfg.MODEL.WEIGHTS`` loaded (non-strict; trainable-only files too), eval mode."""
    check_weights(cfg.MODEL.WEIGHTS)
    return inference.load_model(cfg, logger)


def model_from_args(args: argparse.Namespace, referring: bool = True) -> Tuple[CfgNode, torch.nn.Module]:
    cfg = setup_cfg(args.config_file, args.weights, args.opts)
    if referring:
        require_referring(cfg, args.config_file)
    return cfg, load_model(cfg)


def model_and_dataset_from_args(
    args: argparse.Namespace,
) -> Tuple[CfgNode, torch.nn.Module, str, Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]]:
    """``(cfg, referring model, data set name, (dataset dict, model input) iterator)`` of a model
    tool's :func:`add_model_args` arguments (``--dataset`` default: the config's first test set)."""
    cfg, model = model_from_args(args)
    dataset = default_dataset(cfg, args.dataset)
    return cfg, model, dataset, iterate_dataset(cfg, dataset, args.max_samples)


# ---------------------------------------------------------------------------------------- data
def default_dataset(cfg: CfgNode, dataset: Optional[str] = None) -> str:
    if dataset:
        return dataset
    if not len(cfg.DATASETS.TEST):
        raise ValueError("no data set given: pass --dataset NAME or set DATASETS.TEST in the config")
    return cfg.DATASETS.TEST[0]


def iterate_dataset(
    cfg: CfgNode, dataset_name: str, max_samples: Optional[int] = None
) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """``(dataset dict, model input)`` for the first ``max_samples`` samples of ``dataset_name``."""
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"data set {dataset_name!r} is not registered (see datasets/README.md; "
            "synthetic ones live under $DETECTRON2_DATASETS/synthetic)"
        )
    dicts = DatasetCatalog.get(dataset_name)
    if max_samples is not None and max_samples >= 0:
        dicts = dicts[:max_samples]
    mapper = build_test_mapper(cfg, dataset_name)
    for d in dicts:
        yield d, mapper(dict(d))


def batched(items: Iterable[Any], batch_size: int) -> Iterator[List[Any]]:
    batch: List[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == max(1, batch_size):
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def run_head_with_intermediates(
    model: torch.nn.Module, inputs: List[Dict[str, Any]]
) -> Tuple[Dict, Dict, Any]:
    """``(decoder outputs with BSF intermediates, condition-head outputs, ImageList)``."""
    images = model.preprocess_image(inputs)
    outputs, cond = model.run_head(inputs, images, return_intermediates=True)
    return outputs, cond, images


# ---------------------------------------------------------------------------------------- results
def resolve_per_expression(path: str) -> List[str]:
    """``path`` itself when it is a file; else every ``per_expression.json`` below the folder."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(
            os.path.join(d, "per_expression.json")
            for d, _, files in os.walk(path)
            if "per_expression.json" in files
        )
        if not found:
            raise FileNotFoundError(f"no per_expression.json under {path}")
        return found
    raise FileNotFoundError(f"per-expression results not found: {path}")


def load_per_expression(path: str) -> List[Dict[str, Any]]:
    """The list of per-sample records of a ``ReferringEvaluator`` ``per_expression.json``."""
    with open(path) as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of per-sample records, got {type(records).__name__}")
    for i, r in enumerate(records):
        missing = [k for k in _REQUIRED_RECORD_FIELDS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing} (expected ReferringEvaluator's fields)")
    return records


# ---------------------------------------------------------------------------------------- metrics
def pct(x: float) -> Optional[float]:
    """``100 * x``; NaN (no samples) -> None."""
    return None if x != x else 100.0 * float(x)


def region_metrics(records: Sequence[Dict[str, Any]]) -> Tuple[Optional[float], Optional[float]]:
    """``(cIoU, gIoU)`` in percent of per-sample records (``intersection`` / ``union``): ΣI / ΣU and
    the mean per-sample IoU; None for no records."""
    i = [r["intersection"] for r in records]
    u = [r["union"] for r in records]
    return pct(cumulative_iou(i, u)), pct(mean_iou(i, u))


# ---------------------------------------------------------------------------------------- output
def group_by_synthetic_kind(records: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """The records of each synthetic expression kind (attribute, superlative, relation; kinds
    without records left out), read from their ``expression`` text."""
    kinds = [expression_kind(r["expression"]) for r in records]
    groups = {
        k: [r for r, rk in zip(records, kinds) if rk == k] for k in ("attribute", "superlative", "relation")
    }
    return {k: rs for k, rs in groups.items() if rs}


def _clean(x: Any) -> Any:
    """NaN -> None (strict JSON) recursively."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str, obj: Any) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(obj), f, indent=2)
    return path


def write_text(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def write_report(output_dir: Optional[str], name: str, result: Dict[str, Any], data: Any = None) -> None:
    """With an ``output_dir``: ``<name>.json`` (``data``; default ``result`` without its
    ``"markdown"``) and ``<name>.md`` (``result["markdown"]``). Nothing without one."""
    if not output_dir:
        return
    if data is None:
        data = {k: v for k, v in result.items() if k != "markdown"}
    write_json(os.path.join(output_dir, f"{name}.json"), data)
    write_text(os.path.join(output_dir, f"{name}.md"), result["markdown"])


def fmt(x: Any, digits: int = 2) -> str:
    """Table cell: numbers with ``digits`` decimals, ``-`` for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
