#!/usr/bin/env python
"""Distribution of the adaptive fusion-gate values per decoder layer (FlowSeg paper Fig. 7).

The gate of eq. 2, ``g = sigmoid(W_g [Q_vis || Q_sem])``, is a vector in (0,1)^h per query and
layer; eq. 3 mixes ``g * Q_vis + (1 - g) * Q_sem`` (g → 1: visual, g → 0: semantic). For each
layer l = 1..L the tool pools the gate values over samples and queries — every channel value
(``--granularity element``, default) or each query's mean over its channels (``query``) — and
reports mean, std, min, max, the 5/25/50/75/95 % quantiles and a histogram on [0,1].

Memory stays bounded on large data sets: mean / std are exact running sums, quantiles come from
a 10,000-bin histogram (error <= 1e-4, linear interpolation inside a bin); the JSON keeps a
50-bin histogram. Writes ``gate_distribution.json`` and ``gate_distribution.png`` (a box per
layer: box = quartiles, whiskers = 5/95 %, triangle = mean).

    python tools/analysis/gate_distribution.py --config-file configs/flowseg_refcoco.yaml \
        --weights model_final.pth --dataset refcoco_unc_val --max-samples 500 --output-dir output/analysis
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    add_model_args,
    batched,
    model_and_dataset_from_args,
    run_head_with_intermediates,
    setup_logging,
    write_json,
)

logger = logging.getLogger("flowseg.analysis.gates")

__all__ = ["GateHistogram", "gate_distribution", "plot_gate_distribution", "main"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
FINE_BINS = 10000
JSON_BINS = 50


class GateHistogram:
    """Running statistics of values in [0, 1]: exact count / mean / std / min / max, binned quantiles."""

    def __init__(self, bins: int = FINE_BINS) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.n = 0
        self.sum = 0.0
        self.sum_sq = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().double().flatten().cpu()
        if v.numel() == 0:
            return
        self.n += v.numel()
        self.sum += float(v.sum())
        self.sum_sq += float((v * v).sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        idx = (v.clamp(0.0, 1.0) * self.bins).long().clamp(max=self.bins - 1)
        self.counts += np.bincount(idx.numpy(), minlength=self.bins)

    @property
    def mean(self) -> float:
        return self.sum / self.n

    @property
    def std(self) -> float:
        return float(np.sqrt(max(self.sum_sq / self.n - self.mean**2, 0.0)))

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the data lies (linear inside the bin), clipped to [min, max]."""
        cum = np.cumsum(self.counts)
        target = q * self.n
        b = int(np.searchsorted(cum, target, side="left"))
        b = min(b, self.bins - 1)
        below = cum[b - 1] if b > 0 else 0
        frac = (target - below) / self.counts[b] if self.counts[b] else 0.0
        value = (b + frac) / self.bins
        return float(min(max(value, self.min), self.max))

    def coarse_histogram(self, bins: int = JSON_BINS) -> Dict[str, List[float]]:
        if self.bins % bins:
            raise ValueError(f"{bins} bins do not divide {self.bins}")
        counts = self.counts.reshape(bins, -1).sum(1)
        return {"edges": np.linspace(0.0, 1.0, bins + 1).tolist(), "counts": counts.tolist()}

    def summary(self) -> Dict[str, Any]:
        return {
            "count": self.n,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "quantiles": {f"{q:g}": self.quantile(q) for q in QUANTILES},
            "histogram": self.coarse_histogram(),
        }


@torch.no_grad()
def gate_distribution(
    model: torch.nn.Module,
    inputs: Iterable[Dict[str, Any]],
    granularity: str = "element",
    batch_size: int = 1,
) -> Dict[str, Any]:
    """Per-layer gate statistics over ``inputs`` (model inputs from a test mapper)."""
    if granularity not in ("element", "query"):
        raise ValueError(f"granularity must be 'element' or 'query', got {granularity!r}")
    hists: List[GateHistogram] = []
    num_samples = 0
    for batch in batched(inputs, batch_size):
        outputs, cond, _ = run_head_with_intermediates(model, batch)
        gates = outputs.get("gates", [])
        if not gates:
            raise ValueError(
                "the decoder returned no fusion gates: MODEL.FLOWSEG.SEMANTIC_REFINEMENT must be on "
                "(and the model in referring mode or generic mode with an LLM)"
            )
        if not hists:
            hists = [GateHistogram() for _ in gates]
        # Samples without a valid condition use Q_vis unchanged (their gate is not applied): skip them.
        has_cond = cond["condition_mask"].any(dim=1) if "condition_mask" in cond else None
        for hist, g in zip(hists, gates):  # g: [B,Q,h]
            if has_cond is not None:
                g = g[has_cond.to(g.device)]
            hist.update(g.mean(-1) if granularity == "query" else g)
        num_samples += len(batch)
    if not hists:
        raise ValueError("no samples")
    return {
        "granularity": granularity,
        "num_samples": num_samples,
        "layers": [{"layer": i + 1, **h.summary()} for i, h in enumerate(hists)],
    }


def plot_gate_distribution(result: Dict[str, Any], path: str, title: Optional[str] = None) -> str:
    """Box per layer from the binned statistics (matplotlib ``bxp``: no raw values needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = []
    for layer in result["layers"]:
        q = layer["quantiles"]
        stats.append(
            {
                "label": str(layer["layer"]),
                "whislo": q["0.05"],
                "q1": q["0.25"],
                "med": q["0.5"],
                "q3": q["0.75"],
                "whishi": q["0.95"],
                "mean": layer["mean"],
                "fliers": [],
            }
        )
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 + 0.6 * len(stats)), 3.6), dpi=120)
    ax.bxp(
        stats,
        showmeans=True,
        showfliers=False,
        patch_artist=True,
        boxprops={"facecolor": "#9ecae1"},
        medianprops={"color": "#08519c"},
    )
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")  # balanced visual / semantic mix
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("gate g  (1: visual, 0: semantic)")
    ax.set_title(
        title or f"Fusion gates ({result['num_samples']} samples, per {result['granularity']})", fontsize=9
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg, model, dataset, samples = model_and_dataset_from_args(args)
    inputs = (x for _, x in samples)
    result = gate_distribution(model, inputs, args.granularity, args.batch_size)
    result.update(dataset=dataset, weights=cfg.MODEL.WEIGHTS)
    if args.output_dir:
        result["png"] = plot_gate_distribution(result, os.path.join(args.output_dir, "gate_distribution.png"))
        write_json(os.path.join(args.output_dir, "gate_distribution.json"), result)
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--granularity",
        choices=("element", "query"),
        default="element",
        help="pool every gate channel (element) or each query's channel mean (query)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--output-dir", default=None, help="write gate_distribution.{json,png} here")
    add_model_args(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    result = run(parse_args(argv))
    for layer in result["layers"]:
        q = layer["quantiles"]
        print(
            f"layer {layer['layer']}: mean {layer['mean']:.3f} std {layer['std']:.3f} "
            f"median {q['0.5']:.3f} [5%, 95%] = [{q['0.05']:.3f}, {q['0.95']:.3f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
