"""Log files without terminal colour codes.

Detectron2's ``setup_logger`` gives its file handler a plain formatter, but several messages carry
their colour in the text itself: ``default_setup`` logs the config highlighted by pygments, the
data-set histogram is ``colored(table, "cyan")`` and fvcore's missing-key report is coloured too.
Those escape sequences made about half of ``log.txt`` unreadable in an editor. The console keeps
its colours; only handlers that write to files are given a formatter that removes them.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Iterable

__all__ = ["ANSI_ESCAPE", "PlainFileFormatter", "plain_log_files", "setup_plain_log_files"]

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class PlainFileFormatter(logging.Formatter):
    """Detectron2's file format, with ANSI escape sequences removed from the whole record."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return ANSI_ESCAPE.sub("", super().format(record))


def _writes_to_file(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler):
        return True
    stream = getattr(handler, "stream", None)
    # Detectron2 opens log.txt itself and wraps it in a plain StreamHandler
    return isinstance(handler, logging.StreamHandler) and stream not in (sys.stdout, sys.stderr, None)


def plain_log_files(names: Iterable[str] = ("detectron2", "fvcore", "flowseg")) -> int:
    """Give every file handler of the loggers ``names`` a :class:`PlainFileFormatter`; return how
    many handlers were changed. Call after Detectron2's ``setup_logger`` / ``default_setup``."""
    changed = 0
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if _writes_to_file(handler) and not isinstance(handler.formatter, PlainFileFormatter):
                handler.setFormatter(PlainFileFormatter())
                changed += 1
    return changed


def setup_plain_log_files(output_dir: str, rank: int) -> None:
    """Create Detectron2's and fvcore's loggers of ``default_setup`` with plain log files, before
    ``default_setup`` logs the highlighted config. The arguments are those ``default_setup`` passes,
    so its own ``setup_logger`` calls (cached by argument) return these loggers unchanged."""
    from detectron2.utils.logger import setup_logger

    if output_dir:
        setup_logger(output_dir, distributed_rank=rank, name="fvcore")
        setup_logger(output_dir, distributed_rank=rank)
    plain_log_files()
