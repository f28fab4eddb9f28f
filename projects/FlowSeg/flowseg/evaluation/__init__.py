# Referring / reasoning evaluators.
from . import metrics  # noqa: F401
from .gres_evaluation import GRESEvaluator  # noqa: F401
from .reasoning_evaluation import ReasoningEvaluator  # noqa: F401
from .referring_evaluation import MaskRecordEvaluator, ReferringEvaluator  # noqa: F401
