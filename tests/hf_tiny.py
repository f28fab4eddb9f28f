"""Tiny Mask2Former-head models for tests: a Hugging Face Mask2Former (Swin backbone) to compare
against, and our ``BSFTransformerDecoder`` at test sizes, with inputs for it."""

from __future__ import annotations

from typing import Optional

import torch


def tiny_hf_mask2former(
    *,
    hidden: int = 32,
    heads: int = 4,
    queries: int,
    classes: int,
    decoder_layers: int,
    encoder_layers: int,
    mask_hidden: Optional[int] = None,
    encoder_feedforward: Optional[int] = None,
    feedforward: Optional[int] = None,
    pre_norm: bool = False,
    image_size: int = 64,
    universal: bool = True,
    seed: int = 0,
):
    """A randomly initialised Hugging Face Mask2Former on a 4-stage Swin (embed 16), in eval mode.

    ``decoder_layers`` counts as HF (and Mask2Former's yamls) do: D gives D - 1 decoder layers.
    ``mask_hidden`` defaults to ``hidden``; both feed-forward widths default to ``2 * hidden``.
    ``universal``: ``Mask2FormerForUniversalSegmentation`` (with the class head), else the bare
    ``Mask2FormerModel``. Torch's global RNG is seeded with ``seed`` first, so the weights (and what
    the caller draws next) are reproducible.
    """
    import transformers

    torch.manual_seed(seed)
    swin = transformers.SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=swin,
        feature_size=hidden,
        mask_feature_size=hidden if mask_hidden is None else mask_hidden,
        hidden_dim=hidden,
        encoder_feedforward_dim=2 * hidden if encoder_feedforward is None else encoder_feedforward,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        num_attention_heads=heads,
        dim_feedforward=2 * hidden if feedforward is None else feedforward,
        num_queries=queries,
        num_labels=classes,
        pre_norm=pre_norm,
    )
    if universal:
        return transformers.Mask2FormerForUniversalSegmentation(config).eval()
    return transformers.Mask2FormerModel(config).eval()


def bsf_decoder(
    *,
    hidden: int,
    heads: int,
    queries: int,
    classes: int,
    layers: int,
    feedforward: int,
    in_channels: Optional[int] = None,
    **kw,
):
    """A ``BSFTransformerDecoder`` in eval mode (Mask2Former's decoder with post-norm, mask dim =
    ``hidden``, no input projection when ``in_channels`` is ``hidden``, the default); ``kw`` adds
    or overrides constructor arguments."""
    from flowseg.modeling.transformer_decoder import BSFTransformerDecoder

    args = dict(
        in_channels=hidden if in_channels is None else in_channels,
        num_classes=classes,
        hidden_dim=hidden,
        num_queries=queries,
        nheads=heads,
        dim_feedforward=feedforward,
        dec_layers=layers,
        pre_norm=False,
        mask_dim=hidden,
        enforce_input_project=False,
    )
    args.update(kw)
    return BSFTransformerDecoder(**args).eval()


def decoder_inputs(b: int = 2, channels: int = 32, mask_dim: int = 32, seed: int = 0, conditions: int = 0):
    """Inputs of a transformer decoder for a 64 x 96 image, drawn from one generator seeded with
    ``seed``: three feature levels (1/32, 1/16, 1/8) of ``channels``, the 1/4 mask features and, if
    ``conditions`` is K > 0, K condition embeddings ``[b, K, mask_dim]``.

    Returns ``(x, mask_features)``, or ``(x, mask_features, conditions)`` when K > 0.
    """
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(b, channels, h, w, generator=g) for h, w in ((2, 3), (4, 6), (8, 12))]
    mask_features = torch.randn(b, mask_dim, 16, 24, generator=g)
    if not conditions:
        return x, mask_features
    return x, mask_features, torch.randn(b, conditions, mask_dim, generator=g)
