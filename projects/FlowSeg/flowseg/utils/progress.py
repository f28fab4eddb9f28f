"""Progress lines of a multi-stage job, saved to a file, with an overall ETA.

Each training stage runs in its own ``train_net.py`` process whose console shows only that stage's
ETA. :class:`JobProgress` prints the job's own lines (``[main  508s] ...``), appends them to a log
file in the job's output folder, and estimates the time left for all stages together from the
iterations in each stage's ``metrics.json`` and the seconds per iteration measured so far.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Dict, Optional, Sequence

__all__ = ["JobProgress", "last_iteration"]


def last_iteration(metrics_json: str) -> Optional[int]:
    """The last training iteration logged in Detectron2's ``metrics.json`` (None if none yet)."""
    if not os.path.isfile(metrics_json):
        return None
    last = None
    with open(metrics_json) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written
            if isinstance(rec, dict) and "total_loss" in rec and "iteration" in rec:
                last = int(rec["iteration"])
    return last


class JobProgress:
    """Job progress lines (console and ``log_file``) and an overall training ETA.

    ``plan`` maps stage name -> training iterations, in running order. The ETA is the iterations
    left in the current and later stages times the seconds per iteration measured in the current
    stage (or the last one measured): stages differ in cost, so it is refined as each one runs.
    """

    def __init__(self, plan: Dict[str, int], log_file: Optional[str] = None, t0: Optional[float] = None):
        self.plan = {k: int(v) for k, v in plan.items() if int(v) > 0}
        self.done: Dict[str, int] = {}
        self.rate: Optional[float] = None  # seconds per iteration, last measured
        self.t0 = time.time() if t0 is None else t0
        self.log_file = log_file
        if log_file:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)

    def log(self, msg: str) -> str:
        """Print ``[main  Ns] msg`` and append it to the log file; return the line."""
        line = f"[main {time.time() - self.t0:6.0f}s] {msg}"
        print(line, flush=True)
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        return line

    def update(self, stage: str, iteration: int, now: float, stage_start: float, first_it: int) -> None:
        """Record that ``stage`` reached ``iteration`` (0-based) at ``now``; its process started
        at ``stage_start`` from ``first_it`` (a resumed stage starts past 0)."""
        self.done[stage] = iteration + 1
        if iteration + 1 > first_it and now > stage_start:
            self.rate = (now - stage_start) / (iteration + 1 - first_it)

    def finish(self, stage: str) -> None:
        self.done[stage] = self.plan.get(stage, 0)

    def remaining_iterations(self) -> int:
        return sum(max(n - self.done.get(s, 0), 0) for s, n in self.plan.items())

    def eta_seconds(self) -> Optional[float]:
        """Seconds of training left in all stages (None before any rate is measured)."""
        return None if self.rate is None else self.rate * self.remaining_iterations()

    def eta_text(self) -> str:
        eta = self.eta_seconds()
        if eta is None:
            return "overall ETA: after the first logged iterations"
        return f"overall ETA {eta / 60:.1f} min of training ({self.rate:.2f} s/it, evaluation not included)"

    def run_stage(
        self, cmd: Sequence[str], stage: str, output_dir: str, cwd: str, every: float = 120.0
    ) -> None:
        """Run one stage's training command, logging its iteration and the overall ETA every
        ``every`` seconds; raise ``CalledProcessError`` like ``subprocess.run(check=True)``."""
        metrics = os.path.join(output_dir, "metrics.json")
        start, first = time.time(), (last_iteration(metrics) or -1) + 1
        proc = subprocess.Popen(list(cmd), cwd=cwd)
        next_report = start + every
        while proc.poll() is None:
            time.sleep(min(5.0, every))
            if time.time() >= next_report:
                next_report += every
                it = last_iteration(metrics)
                if it is not None and it + 1 > first:
                    self.update(stage, it, time.time(), start, first)
                total = self.plan.get(stage, "?")
                done = "?" if it is None else it + 1
                self.log(f"{stage}: iteration {done}/{total}; {self.eta_text()}")
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, list(cmd))
        it = last_iteration(metrics)
        if it is not None and it + 1 > first:
            self.update(stage, it, time.time(), start, first)
        self.finish(stage)
