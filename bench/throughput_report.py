"""The rows of bench/train_throughput.py: a row's figures from its step time and the
fixed-width table (the JSON file is written with megatron_vlm.fsutil.write_json_atomic,
so tools/gpu_check.py, reading it while the bench runs, never sees half of one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Row:
    """One line of the table (and of the JSON ``rows``)."""

    variant: str
    precision: str = ""
    tokens_per_s: Optional[float] = None
    step_s: Optional[float] = None
    tflops: Optional[float] = None
    mfu_bf16_peak: Optional[float] = None  # against the dense bf16 peak: every row
    mfu_fp8_peak: Optional[float] = None  # against the dense FP8 peak: FP8 rows only
    peak_mem_gib: Optional[float] = None
    ratio_vs_torch: Optional[float] = None
    ratio_vs_compile: Optional[float] = None
    loss: Optional[float] = None
    note: str = ""


def figures(step_s: float, tokens_per_step: int, flops_per_token: float, peaks,
            fp8: bool) -> dict:
    """A row's throughput fields from its median step time: tokens/s, model TFLOP/s, and MFU
    against the bf16 peak and, for an FP8 row, the FP8 peak (``peaks``: flops.DevicePeaks)."""
    from megatron_vlm.training import flops

    tokens_per_s = tokens_per_step / step_s
    flops_per_s = flops_per_token * tokens_per_s
    return {"tokens_per_s": tokens_per_s, "step_s": step_s, "tflops": flops_per_s / 1e12,
            **flops.mfu_by_peak(flops_per_s, peaks, fp8)}


def add_ratios(rows: list[Row]) -> None:
    """Throughput of each row against the torch and torch+compile rows of the same run."""
    by_name = {r.variant: r.tokens_per_s for r in rows}
    for row in rows:
        if row.tokens_per_s is None:
            continue
        if by_name.get("torch"):
            row.ratio_vs_torch = row.tokens_per_s / by_name["torch"]
        if by_name.get("torch+compile"):
            row.ratio_vs_compile = row.tokens_per_s / by_name["torch+compile"]


def format_table(rows: list[Row]) -> str:
    """The rows as fixed-width text."""
    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    # Each MFU column names its peak: an FP8 row's MFU against the bf16 peak is not its use of
    # the FP8 hardware (whose dense peak is about twice the bf16 one).
    head = (f"{'variant':<16} {'precision':<14} {'tokens/s':>10} {'step s':>8} {'TFLOP/s':>8} "
            f"{'MFU(bf16pk)':>11} {'MFU(fp8pk)':>10} {'peak GiB':>8} {'vs torch':>8} "
            f"{'vs compile':>10} {'loss':>7}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.variant:<16} {r.precision or '-':<14} {num(r.tokens_per_s, ',.0f'):>10} "
            f"{num(r.step_s, '.4f'):>8} {num(r.tflops, '.3f'):>8} "
            f"{num(r.mfu_bf16_peak, '.1%'):>11} {num(r.mfu_fp8_peak, '.1%'):>10} "
            f"{num(r.peak_mem_gib, '.2f'):>8} {num(r.ratio_vs_torch, '.2f'):>8} "
            f"{num(r.ratio_vs_compile, '.2f'):>10} {num(r.loss, '.3f'):>7}  {r.note}")
    return "\n".join(lines)
