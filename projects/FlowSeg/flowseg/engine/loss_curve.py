"""A loss-curve picture of a training run, drawn from Detectron2's ``metrics.json``.

``metrics.json`` (json lines, written by Detectron2's ``JSONWriter``) holds every logged loss but
needs a tool to read; ``loss_curve.png`` next to it shows the total loss and the last decoder
layer's terms at a glance, redrawn at every checkpoint and at the end of training.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, List, Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["LossCurveHook", "plot_loss_curve", "read_training_log"]

logger = logging.getLogger(__name__)

_DEEP_SUPERVISION = re.compile(r"_\d+$")  # loss_ce_0 ... : the intermediate decoder layers


def read_training_log(metrics_json: str) -> Dict[int, Dict[str, float]]:
    """iteration -> logged scalars of the training lines (with ``total_loss``) of ``metrics_json``;
    a resumed run's repeated iterations keep their last value."""
    rows: Dict[int, Dict[str, float]] = {}
    with open(metrics_json) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
            if isinstance(rec, dict) and "total_loss" in rec and "iteration" in rec:
                rows[int(rec["iteration"])] = rec
    return rows


def plot_loss_curve(metrics_json: str, out_png: str) -> List[str]:
    """Draw the total loss and each final-layer ``loss_*`` term over the iterations into
    ``out_png``; return the plotted keys (empty, and nothing written, without training lines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_training_log(metrics_json)
    if not rows:
        return []
    its = sorted(rows)
    keys = ["total_loss"] + sorted(
        {k for r in rows.values() for k in r if k.startswith("loss_") and not _DEEP_SUPERVISION.search(k)}
    )
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for k in keys:
        pts = [(i, rows[i][k]) for i in its if isinstance(rows[i].get(k), (int, float))]
        marker = "o" if len(pts) < 30 else None  # a short run's few points stay visible
        ax.plot(*zip(*pts), label=k, linewidth=2.0 if k == "total_loss" else 1.0, marker=marker, markersize=3)
    if all(v > 0 for i in its for k in keys if isinstance(v := rows[i].get(k), (int, float))):
        ax.set_yscale("log")  # the terms differ by orders of magnitude
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median of the logging window)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_json))) or "training")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)  # outside the curves
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(out_png)
    return keys


class LossCurveHook(HookBase):
    """Redraw ``OUTPUT_DIR/loss_curve.png`` every ``period`` iterations and after training (main
    process; registered after Detectron2's writers, so the last lines are in ``metrics.json``)."""

    def __init__(self, output_dir: str, period: int) -> None:
        self._metrics = os.path.join(output_dir, "metrics.json")
        self._out = os.path.join(output_dir, "loss_curve.png")
        self._period = period

    def _draw(self) -> Optional[str]:
        if not comm.is_main_process() or not os.path.isfile(self._metrics):
            return None
        try:
            plot_loss_curve(self._metrics, self._out)
        except (OSError, ValueError) as e:  # a picture is not worth stopping a training run for
            logger.warning("Could not draw %s: %r", self._out, e)
            return None
        return self._out

    def after_step(self) -> None:
        if self._period > 0 and (self.trainer.iter + 1) % self._period == 0:
            self._draw()

    def after_train(self) -> None:
        if self._draw():
            logger.info("Loss curve: %s", self._out)
