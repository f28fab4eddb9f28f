"""Referring-segmentation X-SAM fixtures (Qwen3 and Phi-3 tiny LLMs): X-SAM's RefCOCO
evaluation path on one synthetic image and one `<p>...</p>` prompt."""

from __future__ import annotations

import tempfile
from pathlib import Path

from xsam_tiny import (
    EXPRESSION,
    IMAGE_HW,
    SAM_HIDDEN,
    SEED,
    half_state_dict,
    model_configs,
    perturb_weights,
    round_weights_to_half,
    sam_processor,
    siglip_processor,
    tiny_llm,
    tiny_segmentor,
    tiny_siglip,
    train_briefly,
    train_tiny_tokenizer,
)


def build_xsam_referring(kind: str, tok_dir: Path):
    """X-SAM's stage-3 model (s3_train config's XSamModel arguments) at tiny sizes."""
    from transformers import AutoTokenizer
    from xsam.dataset.process_fns import img_genseg_postprocess_fn
    from xsam.model import XSamModel
    from xsam.model.utils import frame_transpose_temporal_process_fn, temporal_process_fn_factory

    base_vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    tokenizer = dict(
        type=AutoTokenizer.from_pretrained,
        pretrained_model_name_or_path=str(tok_dir),
        trust_remote_code=True,
        padding_side="right",
    )
    temporal = dict(type=temporal_process_fn_factory, fn=frame_transpose_temporal_process_fn)
    model = XSamModel(
        freeze_llm=False,
        freeze_vision_encoder=False,
        freeze_mask_encoder=False,
        use_dual_encoder=True,
        use_vision_sampler=True,
        temporal_process_fn=temporal,
        extra_temporal_process_fn=dict(temporal),
        connector_type="conv",
        cond_type="phrase",
        extra_select_layers=[6, 12, 18, 24],
        connector_hidden_dim=SAM_HIDDEN,
        connector_scale_factor=[4, 2, 1, 0.5],
        sampler_input_feat="extra_pixel_values",
        sampler_pooling_mode="mean",
        sampler_pooling_kernel_size=4,
        sampler_pooling_output_size=None,
        special_tokens=["<SEG>", "<p>", "</p>"],
        tokenizer=tokenizer,
        ignore_label=-100,
        background_label=-1,
        ptoken_shift=0,
        postprocess_fn=img_genseg_postprocess_fn,
        llm=tiny_llm(kind, base_vocab),
        vision_encoder=tiny_siglip(),
        segmentor=tiny_segmentor("learn"),
        use_activation_checkpointing=False,
    )
    return model.eval(), tokenizer


def make_refseg_dataset(kind: str, tokenizer: dict, image_dir: Path, image_file: str):
    """X-SAM's RefCOCO evaluation dataset (num_class=1, answers kept) on one synthetic sample."""
    from xsam.dataset import ImgRefSegDataset
    from xsam.dataset.map_fns import dataset_map_fn_factory, img_refseg_map_fn, template_map_fn_factory
    from xsam.dataset.process_fns import img_refseg_postprocess_fn
    from xsam.utils.template import PROMPT_TEMPLATE

    height, width = IMAGE_HW
    # a polygon over the left part of the image: the referred object (only feeds the GT mask)
    polygon = [4.0, 6.0, 26.0, 6.0, 26.0, 34.0, 4.0, 34.0]
    record = {
        "image_id": 1,
        "image_file": image_file,
        "image_size": (height, width),
        "sampled_sents": [EXPRESSION],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "segmentation": [polygon], "iscrowd": 0}],
        "image_info": {"image_id": 1, "file_name": image_file, "height": height, "width": width},
    }

    class OneSampleRefSeg(ImgRefSegDataset):
        def _load_ann_data(self):  # X-SAM reads REFER files here; one in-memory record instead
            self._set_metadata()
            return [record]

    template = PROMPT_TEMPLATE.qwen3_instruct if kind == "qwen3" else PROMPT_TEMPLATE.phi3_chat
    return OneSampleRefSeg(
        data_root=str(image_dir),
        image_folder=str(image_dir),
        dataset="refcoco",
        data_split="val",
        data_mode="eval",
        tokenizer=tokenizer,
        task_name="img_refseg",
        data_name="img_refseg_tiny_val",
        cond_type="phrase",
        special_tokens=["<SEG>", "<p>", "</p>"],
        extra_image_processor=sam_processor(),
        output_ids_with_output=True,
        image_processor=siglip_processor(),
        postprocess_fn=img_refseg_postprocess_fn,
        dataset_map_fn=dict(
            type=dataset_map_fn_factory, fn=img_refseg_map_fn, cond_type="phrase", image_token="<image>"
        ),
        template_map_fn=dict(type=template_map_fn_factory, template=template, output_suffix=True),
        num_class=1,
        max_length=2048,
        expand2square=False,
        use_placeholder=False,
        ignore_value=255,
        background_label=-1,
    ), template


def synthetic_image(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = IMAGE_HW
    img = (rng.random((height, width, 3)) * 60 + 80).astype(np.uint8)
    img[6:34, 4:26] = (200, 30, 30)  # red box, left
    yy, xx = np.mgrid[:height, :width]
    img[(yy - 20) ** 2 + (xx - 42) ** 2 < 100] = (30, 40, 210)  # blue disc, right
    Image.fromarray(img).save(path)


class Recorder:
    """Keeps what X-SAM's modules receive and return during one forward."""

    def __init__(self, model) -> None:
        self.data: dict = {}
        self.handles = [
            model.segmentor.register_forward_pre_hook(self._segmentor_in, with_kwargs=True),
            model.segmentor.decoder.register_forward_hook(self._decoder_out),
            model.seg_connector.register_forward_hook(self._connector_out),
            model.llm.register_forward_hook(self._llm_out),
        ]

    def _segmentor_in(self, module, args, kwargs):
        for key in ("cond_embeds", "seg_embeds", "embed_masks"):
            if kwargs.get(key) is not None:
                self.data[key] = kwargs[key].detach().clone()

    def _decoder_out(self, module, args, output):
        self.data["mask_logits_lowres"] = output.masks_queries_logits[-1].detach().clone()

    def _connector_out(self, module, args, output):
        self.data["connector_shapes"] = [list(x.shape) for x in output]

    def _llm_out(self, module, args, output):
        self.data["llm_seq_len"] = int(output.hidden_states[-1].shape[1])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


TRAIN_STEPS = 40
TRAIN_LR = 3e-3


def forward_once(model, dataset, item) -> dict:
    """X-SAM's evaluation call on one collated sample; returns inputs, recorded outputs and
    X-SAM's post-processed result."""
    import torch
    from xsam.dataset.collate_fns import xsam_collate_fn
    from xsam.dataset.process_fns import img_refseg_postprocess_fn

    batch = model.data_preprocessor(xsam_collate_fn([item]), False)
    names = ("pixel_values", "extra_pixel_values", "input_ids", "cond_ids", "seg_ids")
    inputs = {name: batch["data_dict"][name].clone() for name in names}  # the forward pops them
    captured: dict = {}

    def recording_postprocess(outputs, **kwargs):
        captured["class_queries_logits"] = outputs.class_queries_logits.detach().clone()
        captured["masks_queries_logits"] = outputs.masks_queries_logits.detach().clone()
        captured["postprocess_got_cond_ids"] = kwargs.get("cond_ids") is not None
        captured["postprocess_use_bg_embeds"] = bool(kwargs.get("use_bg_embeds"))
        return img_refseg_postprocess_fn(outputs, **kwargs)

    model.postprocess_fn = recording_postprocess
    recorder = Recorder(model)
    with torch.no_grad():
        _, results = model(**batch, mode="tensor", metadata=dataset.metadata, do_postprocess=True)
    recorder.remove()
    result = results[0]
    outputs = {
        **captured,
        **recorder.data,
        "segmentation": result["segmentation"].clone(),
        "score": result["segments_info"]["score"],
    }
    return {"inputs": inputs, "outputs": outputs}


def run_referring(kind: str, out_dir: Path) -> dict:
    import random

    import numpy as np
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    work = Path(tempfile.mkdtemp(prefix=f"xsam_{kind}_"))
    tok_dir = train_tiny_tokenizer(kind, work)
    model, tokenizer = build_xsam_referring(kind, tok_dir)
    synthetic_image(work / "tiny.png", SEED)
    dataset, template = make_refseg_dataset(kind, tokenizer, work, "tiny.png")
    losses = train_briefly(model, [lambda: dataset[0]], TRAIN_STEPS, TRAIN_LR)
    round_weights_to_half(model)
    random.seed(SEED)  # X-SAM picks its question / answer template with `random.choice`
    item = dataset[0]
    run = forward_once(model, dataset, item)
    state_dict = half_state_dict(model)
    configs = model_configs(model)
    perturb_weights(model, 1e-6, SEED)
    probe = forward_once(model, dataset, item)["outputs"]
    sensitivity = {
        key: float((probe[key] - run["outputs"][key]).abs().max())
        for key in ("class_queries_logits", "masks_queries_logits")
    }
    sensitivity["segmentation_changed_pixels"] = int(
        (probe["segmentation"] != run["outputs"]["segmentation"]).sum()
    )
    tok = dataset.tokenizer
    prompt_ids = run["inputs"]["input_ids"][0].tolist()
    return {
        "kind": kind,
        "state_dict": state_dict,
        "full_state_dict_keys": sorted(model.full_state_dict().keys()),
        "tokenizer_files": {p.name: p.read_text() for p in sorted(tok_dir.iterdir()) if p.is_file()},
        "special_token_ids": {
            "<SEG>": model.seg_token_idx,
            "<p>": model.pstart_token_idx,
            "</p>": model.pend_token_idx,
            "base_vocab": len(tok) - 3,
            "len_tokenizer": len(tok),
        },
        "conversation": item["conversations"],
        "prompt_text": tok.decode([i for i in prompt_ids if i >= 0], skip_special_tokens=False),
        "image_token_index": -200,
        "image_size": list(item["image_size"]),
        "scaled_size": list(item["scaled_size"]),
        "inputs": run["inputs"],
        "outputs": run["outputs"],
        "train_losses": losses,
        "sensitivity_to_1e-6_weight_noise": sensitivity,
        "template": dict(template),
        "_configs": configs,
    }
