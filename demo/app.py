#!/usr/bin/env python
"""FlowSeg web demo (Gradio): an image and one or several expressions in, coloured masks out.

    python demo/app.py --config-file output/main/config.yaml --weights output/main/model_final.pth \
        [--device cpu|cuda] [--host 127.0.0.1] [--port 7860] [--opts KEY VALUE ...]

The model is loaded once; requests are queued and served by that one instance. Loading,
inference and drawing are ``demo/demo.py``'s (:mod:`flowseg.utils.referring_demo`): the page shows
the same overlay and offers the same files (overlay PNG, one mask PNG per answer, COCO RLE JSON).
Expressions: one per line; a line with several ``<p>…</p>`` spans gives one answer per span; all
of an image's expressions share one image encoding. Tasks: referring, reasoning, gres
(multi / no target), generic (the lines are class names; none: the model's metadata classes). Bad input (no image, an unreadable one, an
empty expression, unbalanced ``<p>``, a prompt longer than ``MODEL.LLM.MAX_LENGTH``) is shown as
``error: ...`` in the page and the server keeps serving. Nothing is fetched from outside: Gradio's
analytics are off and the theme uses the browser's own fonts.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, List, Optional, Sequence, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "projects", "FlowSeg") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))  # run from a checkout without installing

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from flowseg.utils.inference import add_opts_argument  # noqa: E402
from flowseg.utils.referring_demo import (  # noqa: E402
    TASKS,
    DemoError,
    ReferringDemo,
    check_image_array,
    load_demo,
    output_stem,
    read_image,
    save_outputs,
)
from PIL import Image  # noqa: E402

logger = logging.getLogger("flowseg.demo")

__all__ = ["build_app", "segment", "prune_old_requests", "main"]

# what the main job (bash tools/run_main.sh) leaves
DEFAULT_CONFIG = os.path.join("output", "main", "config.yaml")
DEFAULT_WEIGHTS = os.path.join("output", "main", "model_final.pth")


def segment(
    demo: ReferringDemo, out_root: str, image_path: Optional[str], text: str, task: str
) -> Tuple[Optional[np.ndarray], Optional[List[str]], str]:
    """One request: (overlay RGB, [JSON, mask PNGs, overlay PNG], status line). A user error gives
    (None, None, ``"error: ..."``) instead of an exception, so the page shows it."""
    start = time.perf_counter()
    try:
        if not image_path:
            raise DemoError("no image: upload or paste one, or pick an example")
        image = read_image(image_path, demo.image_format)
        check_image_array(image)
        expressions = (text or "").splitlines()
        results = demo.predict(image, expressions, task)
        overlay = demo.draw(image, results)
        expressions = [e.strip() for e in expressions if e.strip()]
        prune_old_requests(out_root)
        out_dir = tempfile.mkdtemp(prefix="request_", dir=out_root)
        files = save_outputs(
            out_dir,
            output_stem(image_path, expressions, task),
            overlay,
            results,
            task=task,
            expressions=expressions,
        )
    except DemoError as e:
        logger.warning("request refused: %s", e)
        return None, None, f"error: {e}"
    seconds = time.perf_counter() - start
    n_empty = sum(1 for r in results if r.no_target or not r.mask.any())
    status = f"{len(results)} answer(s), {n_empty} without target, in {seconds:.2f} s"
    return overlay, [files["json"], *files["masks"], files["overlay"]], status


def prune_old_requests(out_root: str, keep: int = 32) -> None:
    """Remove all but the newest ``keep`` request folders: a long-running server stays bounded
    (the page has copied the files it shows into Gradio's own cache by then)."""
    folders = [e for e in os.scandir(out_root) if e.is_dir() and e.name.startswith("request_")]
    for e in sorted(folders, key=lambda e: e.stat().st_mtime)[: max(0, len(folders) - keep)]:
        shutil.rmtree(e.path, ignore_errors=True)


def build_app(demo: ReferringDemo, out_root: str, examples: Sequence[str] = ()) -> gr.Blocks:
    """The page: image, expressions and task in; overlay, files and status out (API name ``segment``)."""

    def run(image_path: Optional[str], text: str, task: str) -> Tuple[Any, Any, str]:
        return segment(demo, out_root, image_path, text, task)

    # Gradio's cache of served files: entries older than an hour are removed every hour
    with gr.Blocks(title="FlowSeg demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            "## FlowSeg: referring segmentation\nOne expression per line, or `<p>…</p>` spans in a sentence."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath", label="image", sources=["upload", "clipboard"], elem_id="image"
                )
                text = gr.Textbox(
                    lines=3, label="expressions", placeholder="the red circle", elem_id="expressions"
                )
                task = gr.Radio(list(TASKS), value="referring", label="task", elem_id="task")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                overlay = gr.Image(
                    type="numpy", format="png", label="overlay", interactive=False, elem_id="overlay"
                )
                status = gr.Textbox(label="status", interactive=False, elem_id="status")
                files = gr.File(
                    label="masks (PNG each, COCO RLE JSON)", file_count="multiple", elem_id="files"
                )
        if examples:
            gr.Examples([[e] for e in examples], inputs=[image])
        button.click(run, [image, text, task], [overlay, files, status], api_name="segment")
    return app.queue(default_concurrency_limit=1)


def example_images(folder: str, n: int = 3) -> List[str]:
    """A few pictures of the built-in synthetic data (drawn here, nothing downloaded)."""
    from flowseg.data.synthetic.generate import generate_split

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, scene in enumerate(generate_split("val", n, seed=0, image_size=256)):
        paths.append(os.path.join(folder, f"synthetic_{i}.png"))
        Image.fromarray(np.asarray(scene.image, np.uint8)).save(paths[-1])
    return paths


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="referring-mode FlowSeg config"
    )
    p.add_argument(
        "--weights", default=DEFAULT_WEIGHTS, metavar="FILE", help="checkpoint (sets MODEL.WEIGHTS)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: the config's MODEL.DEVICE)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    add_opts_argument(p, "MODEL.DEVICE cpu")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    opts = list(args.opts) + (["MODEL.DEVICE", args.device] if args.device else [])
    try:
        demo = load_demo(args.config_file, args.weights, opts)
    except DemoError as e:
        hint = ""
        if args.config_file == DEFAULT_CONFIG and not os.path.isfile(DEFAULT_CONFIG):
            hint = " (the default is the main job's model: run bash tools/run_main.sh first, or pass --config-file)"
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    out_root = tempfile.mkdtemp(prefix="flowseg_app_")
    app = build_app(demo, out_root, example_images(os.path.join(out_root, "examples")))
    app.launch(server_name=args.host, server_port=args.port, share=False, allowed_paths=[out_root])
    return 0


if __name__ == "__main__":
    sys.exit(main())
