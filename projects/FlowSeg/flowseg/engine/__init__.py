"""Training pieces for ``train_net.py``: trainer, optimizer, evaluator wiring, loss/ckpt guards."""

from .evaluation import (  # noqa: F401
    ALL_METRICS_FILE,
    build_evaluator,
    check_num_classes,
    metrics_json_path,
    write_metrics_json,
)
from .hooks import (  # noqa: F401
    CheckedAMPTrainer,
    CheckedSimpleTrainer,
    NonFiniteLossError,
    SafePeriodicCheckpointer,
    check_losses_finite,
)
from .optimizer import build_optimizer, get_flowseg_param_groups  # noqa: F401
from .resume import ExactResumeHook  # noqa: F401
from .skipping import BadSampleGuard, write_skipped  # noqa: F401
from .trainer import FlowSegTrainer, amp_precision, resolve_amp  # noqa: F401
