"""Build tiny random X-SAM models with X-SAM's own code and save parity fixtures.

This script is run OUTSIDE FlowSeg's environment, in an environment made for X-SAM's
published code, and imports X-SAM's modules from a local checkout. It never copies X-SAM's
code: it builds X-SAM's classes with tiny random configurations, trains them a few steps with
X-SAM's own loss, runs X-SAM's own evaluation path (its dataset classes, ``xsam_collate_fn``,
``XSamModel`` in ``mode="tensor"`` with ``do_postprocess=True``, as X-SAM's ``ValLoop`` does;
for stage 1 also its panoptic evaluator) and records what comes out. What the fixtures hold and
what they show about X-SAM is in this folder's README.md.

X-SAM source: github ``wanghao9610/X-SAM``, commit
``2e76946bcd690d40ac473a50753ac23e1a138330`` (2026-07-13)::

    mkdir -p /work/xsam_src
    git -C <X-SAM git dir> archive 2e76946bcd690d40ac473a50753ac23e1a138330 | tar -x -C /work/xsam_src

Environment (Python 3.11, CPU torch; X-SAM's CUDA/C++ MSDeformAttn op is NOT compiled, so
X-SAM's Mask2Former falls back to its PyTorch implementation by itself)::

    python3 -m venv /work/xsam_env
    /work/xsam_env/bin/pip install torch==2.13.0 transformers==4.57.1 mmengine==0.10.6 \
        peft scipy tokenizers einops loguru safetensors pycocotools opencv-python-headless \
        scikit-image scikit-learn tabulate pycocoevalcap "numpy>=2,<2.4" "huggingface-hub>=0.34,<1.0" \
        "datasets>=3.2,<4.1" "pandas>=2.2.3"
    /work/xsam_env/bin/pip install --no-deps panopticapi-lite

(``torch==2.13.0`` must resolve to the CPU wheel; ``panopticapi-lite`` provides the
``panopticapi`` module X-SAM's dataset package imports; ``--no-deps`` because its numpy<2
pin breaks pyarrow.)

Command (writes ``tests/fixtures/xsam_tiny_{qwen3,phi3,stage1}.pt`` and ``.json``)::

    cd <FlowSeg checkout>
    nice -n 15 /work/xsam_env/bin/python tools/xsam_parity/make_xsam_fixture.py \
        --xsam-root /work/xsam_src/xsam --out-dir tests/fixtures

Everything is seeded; two runs give bit-identical fixtures on the same machine (34 s to two
minutes on two shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xsam_referring import run_referring
from xsam_stage1 import run_stage1
from xsam_tiny import SEED, XSAM_COMMIT


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--xsam-root", required=True, help="folder holding X-SAM's `xsam` package")
    parser.add_argument("--out-dir", default="tests/fixtures")
    parser.add_argument("--which", nargs="+", default=["qwen3", "phi3", "stage1"])
    return parser.parse_args()


def describe(fixture: dict, model_configs: dict) -> dict:
    """The JSON side file: configs, ids, prompt and key names with shapes (no tensors)."""
    shapes = {k: list(v.shape) for k, v in fixture["state_dict"].items()}
    return {
        "xsam_commit": XSAM_COMMIT,
        "seed": SEED,
        "kind": fixture["kind"],
        "configs": model_configs,
        "special_token_ids": fixture.get("special_token_ids"),
        "conversation": fixture.get("conversation"),
        "prompt_text": fixture.get("prompt_text"),
        "image_size": fixture.get("image_size"),
        "scaled_size": fixture.get("scaled_size"),
        "state_dict_shapes": shapes,
        "pixel_shuffle": fixture.get("pixel_shuffle"),
        "output_shapes": {k: list(v.shape) for k, v in fixture["outputs"].items() if hasattr(v, "shape")},
    }


def check_pixel_shuffle() -> dict:
    """Run X-SAM's pixel_shuffle on index tensors and confirm the channel orderings documented
    in the README (they are not inverses of each other)."""
    import torch
    from xsam.model.utils import pixel_shuffle

    height, width, chans = 4, 6, 3
    x = torch.arange(height * width * chans).reshape(1, height, width, chans)
    down = pixel_shuffle(x, 0.5)
    for i in range(height // 2):
        for j in range(width // 2):
            for dy in (0, 1):
                for dx in (0, 1):
                    got = down[0, i, j, (2 * dy + dx) * chans : (2 * dy + dx + 1) * chans]
                    assert torch.equal(got, x[0, 2 * i + dy, 2 * j + dx]), "downsample ordering changed"
    chans = 8
    x = torch.arange(height * width * chans).reshape(1, height, width, chans)
    up = pixel_shuffle(x, 2)
    quarter = chans // 4
    for i in range(2 * height):
        for j in range(2 * width):
            start = (j % 2) * 2 * quarter + (i % 2) * quarter
            assert torch.equal(up[0, i, j], x[0, i // 2, j // 2, start : start + quarter]), (
                "upsample ordering changed"
            )
    return {
        "downsample_0.5": "out[i, j, (2*dy + dx)*C + c] = in[2i+dy, 2j+dx, c]",
        "upsample_2": "out[i, j, c] = in[i//2, j//2, (j%2)*C/2 + (i%2)*C/4 + c]",
    }


def save(fixture: dict, configs: dict, out_dir: Path, name: str) -> None:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, out_dir / f"{name}.pt")
    (out_dir / f"{name}.json").write_text(
        json.dumps(describe(fixture, configs), indent=1, sort_keys=True) + "\n"
    )
    size = (out_dir / f"{name}.pt").stat().st_size
    print(f"wrote {out_dir / name}.pt ({size / 1024:.0f} KiB) and .json")


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(args.xsam_root).resolve()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out_dir = Path(args.out_dir)
    shuffle_facts = check_pixel_shuffle()
    for kind in args.which:
        if kind in ("qwen3", "phi3"):
            fixture = run_referring(kind, out_dir)
            configs = fixture.pop("_configs")
            fixture["pixel_shuffle"] = shuffle_facts
            save(fixture, configs, out_dir, f"xsam_tiny_{kind}")
        elif kind == "stage1":
            fixture = run_stage1(out_dir)
            configs = fixture.pop("_configs")
            fixture["pixel_shuffle"] = shuffle_facts
            save(fixture, configs, out_dir, "xsam_tiny_stage1")
        else:
            raise SystemExit(f"unknown fixture kind {kind!r}: choose qwen3, phi3 or stage1")


if __name__ == "__main__":
    main()
