"""Token-length statistics of the conversations, per source, and their histogram (a PNG the MR report
embeds: reports/data_lengths.png, written by prepare).

The PNG is reproducible byte for byte (fixed size and dpi, no software or date metadata), so an
unchanged dataset leaves it unchanged in git and in DVC.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.common import atomic_file

HISTOGRAM = Path("reports/data_lengths.png")
BINS = 32
SIZE_INCHES, DPI = (6.4, 3.6), 100


def percentile(ordered: Sequence[int], share: float) -> int:
    """Nearest-rank percentile of sorted values (a value that occurs, as a reader expects of token counts)."""
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else 0


def length_summary(lengths: Sequence[int], max_seq_length: int) -> dict:
    ordered = sorted(lengths)
    return {
        "total": sum(ordered),
        "min": ordered[0] if ordered else 0,
        "median": statistics.median(ordered) if ordered else 0,
        "p95": percentile(ordered, 0.95),
        "max": ordered[-1] if ordered else 0,
        "over_length": sum(1 for length in ordered if length > max_seq_length),
    }


def histogram_png(lengths: Mapping[str, Sequence[int]], max_seq_length: int) -> bytes:
    """One step histogram per source of tokens per conversation, with data.max_seq_length marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    longest = max([max_seq_length, *(max(values) for values in lengths.values() if values)])
    width = max(1, math.ceil(longest * 1.05 / BINS))
    edges = [i * width for i in range(BINS + 1)]
    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    axes = figure.subplots()
    for name, values in lengths.items():
        if values:
            axes.hist(values, bins=edges, histtype="step", linewidth=1.5, label=f"{name} ({len(values)})")
    axes.axvline(max_seq_length, color="black", linestyle="--", linewidth=1, label="data.max_seq_length")
    axes.set_xlabel("tokens per conversation (after the chat template)")
    axes.set_ylabel("conversations")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def write_histogram(lengths: Mapping[str, Sequence[int]], max_seq_length: int, path: Path = HISTOGRAM) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(histogram_png(lengths, max_seq_length))
    return path
