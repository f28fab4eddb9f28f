"""Markdown tables of a benchmark result."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from .models import VARIANTS

#: Table 9's rows in the order printed by ``--count-only``.
TABLE9_ROWS = (
    ("sam_trunk", "SAM-ViT trunk"),
    ("sam_neck", "SAM neck (carried, unused on the connector path)"),
    ("pixel_decoder", "pixel decoder"),
    ("decoder", "transformer decoder (without BSF)"),
    ("bsf", "BSF (SR + CR)"),
    ("logit_scale", "logit scale"),
    ("segmentor", "= segmentor"),
    ("feature_path", "connector (feature path)"),
    ("background_embed", "background embedding"),
    ("llm", "LLM (without LoRA)"),
    ("vision_tower", "vision tower"),
    ("vis_projector", "phi_vis"),
    ("llm_projector", "phi_llm"),
    ("sam_token_projector", "SAM-token projector"),
    ("condition_head_other", "other condition-head parameters"),
    ("total", "= total (Table 9)"),
    ("lora", "LoRA + peft's token rows (not in the total)"),
    ("bar", "BAR (not in the total)"),
)


def count_table(result: Dict[str, Any]) -> str:
    """Markdown table of :func:`param_counts` for both variants."""
    b, f = result["baseline"]["params"], result["flowseg"]["params"]
    lines = ["| Parameters | Baseline (no BSF, no BAR) | FlowSeg (BSF + BAR) |", "|---|---:|---:|"]
    lines += [f"| {label} | {b[k]:,} | {f[k]:,} |" for k, label in TABLE9_ROWS]
    return "\n".join(lines)


def flops_table(result: Dict[str, Any]) -> str:
    """Markdown table of :func:`bench.flops.meta_flop_count` for both variants (Table 9's GFLOPs row
    and its components), and the decoder's GFLOPs per layer."""
    b, f = result["baseline"]["flops"], result["flowseg"]["flops"]
    lines = ["| GFLOPs (2 per multiply-add) | Baseline | FlowSeg | Δ |", "|---|---:|---:|---:|"]
    for name in b["by_component"]:
        x, y = b["by_component"][name], f["by_component"][name]
        lines.append(f"| {name} | {x:,.2f} | {y:,.2f} | {y - x:+,.2f} |")
    x, y = b["gflops"], f["gflops"]
    lines.append(
        f"| **total (Table 9; paper: 18,525.48 → 18,543.00)** | {x:,.2f} | {y:,.2f} | {y - x:+,.2f} |"
    )
    lines.append(f"\nLLM sequence length: {b['llm_sequence_length']} tokens (image + SAM + text)")
    by_k = f.get("bsf_gflops_by_conditions", {})
    if by_k:
        lines += ["\n| conditions K | BSF GFLOPs (9 layers) |", "|---:|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in by_k.items()]
    lines += ["\n| decoder layer | Mask2Former blocks | + BSF | BSF / layer |", "|---|---:|---:|---:|"]
    for i, layer in enumerate(f["decoder_layers_gflops"]):
        m, s = layer["mask2former"], layer["bsf"]
        lines.append(f"| {i} | {m:.3f} | {s:.3f} | {100 * s / m:.2f}% |")
    return "\n".join(lines)


def _m(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _g(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}G"


def _delta(a: Optional[float], b: Optional[float], fmt: Callable[[float], str], pct: bool = True) -> str:
    if a is None or b is None:
        return "-"
    d = b - a
    s = ("+" if d >= 0 else "-") + fmt(abs(d))
    return s + (f" ({100 * d / a:+.2f}%)" if pct and a else "")


def markdown(result: Dict[str, Any]) -> str:
    b, f = result["baseline"], result["flowseg"]
    d = result["deltas"]
    rows = [("", "Baseline (SR/CR off, no BAR)", "FlowSeg (SR+CR+BAR)", "Δ")]

    def row(name: str, key: Callable[[Dict], Optional[float]], fmt: Callable[[float], str], pct: bool = True):
        vb, vf = key(b), key(f)
        rows.append(
            (name, "-" if vb is None else fmt(vb), "-" if vf is None else fmt(vf), _delta(vb, vf, fmt, pct))
        )

    def get(*path):
        def read(d: Dict) -> Optional[float]:
            for p in path:
                if not isinstance(d, dict) or p not in d:
                    return None
                d = d[p]
            return d

        return read

    row("Segmentor params", get("params", "segmentor"), _m)
    row("Total params", get("params", "total"), _m)
    rows.append(("BSF parameter delta (decoder)", "", "", f"+{_m(d['bsf_params'])} ({d['bsf_params']:,})"))
    row("BAR params", get("params", "bar"), lambda v: f"{v / 1e3:.1f}K", pct=False)
    row("Inference memory (peak)", get("inference", "peak_memory_bytes"), _g)
    row("Latency (ms/sample)", get("inference", "ms"), lambda v: f"{v:.2f}")
    row("GFLOPs (fvcore, MACs)", get("flops", "gflops"), lambda v: f"{v:.3f}")
    tb = b.get("train", {}).get("batch")
    row(f"Train step ms ({tb}/device)", get("train", "ms"), lambda v: f"{v:.1f}")
    row(f"Train peak memory ({tb}/device)", get("train", "peak_memory_bytes"), _g)
    for name, label in (
        ("per_expression", "per expression"),
        ("shared_encoders", "shared image encoders"),
        ("shared_encoders_and_llm_prefix", "shared encoders + LLM prefix"),
    ):
        k = b.get("shared_eval", {}).get("k")
        row(
            f"Eval ms/expression, K={k}, {label}",
            get("shared_eval", name, "ms_per_expression"),
            lambda v: f"{v:.2f}",
        )
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    out = "\n".join(lines)
    comps = f.get("flops", {}).get("by_component")
    if comps:
        cb = b["flops"]["by_component"]
        out += "\n\n| GFLOPs by component | Baseline | FlowSeg |\n|---|---|---|\n"
        out += "\n".join(f"| {k} | {cb.get(k, 0):.2f} | {v:.2f} |" for k, v in comps.items())
    for v in VARIANTS:
        for key in ("train",):
            if result[v].get(key, {}).get("oom"):
                out += f"\n\n{v}: training step out of memory: {result[v][key]['error']}"
        if "error" in result[v].get("flops", {}):
            out += f"\n\n{v}: FLOP count failed: {result[v]['flops']['error']}"
    return out
