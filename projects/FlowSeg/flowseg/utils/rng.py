"""Global RNG states: seed them per data-stream step, capture and restore them for exact resume.

Training draws from four global generators: Python's ``random``, NumPy's legacy global state,
torch's CPU generator and (on GPU) one CUDA generator per device. Mappers' augmentations use the
first three, the model's dropout and the criterion's point sampling use torch's.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Dict, Iterator

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "step_seeded_rngs"]


@contextlib.contextmanager
def step_seeded_rngs(seed: int, rank: int, step: int) -> Iterator[None]:
    """Seed ``random``, NumPy and torch's CPU generator from (seed, rank, step); restore on exit.

    Only the CPU generator is seeded: ``torch.manual_seed`` would also reseed every CUDA device's.
    """
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    words = np.random.SeedSequence([seed % 2**63, rank, step]).generate_state(3, dtype=np.uint32)
    random.seed(int(words[0]))
    np.random.seed(int(words[1]))
    torch.default_generator.manual_seed(int(words[2]))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def capture_rng_state() -> Dict[str, Any]:
    """This process's global RNG states, as tensors and plain numbers (checkpoints are read with
    ``torch.load(weights_only=True)``); CUDA's only where CUDA is initialised."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Put back states from :func:`capture_rng_state` (CUDA's only if saved and the devices match)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
