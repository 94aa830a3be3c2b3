"""The PNG plots of benchmarks.run (matplotlib, Agg): cold_start.png, overhead.png, throughput.png."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cold import PHASE_COLUMNS, phase_parts
from benchmarks.overhead import OVERHEAD_LABELS

#: One colour per ``PHASE_COLUMNS`` part.
_PHASE_COLOURS = ("#bbbbbb", "#8da0cb", "#fc8d62", "#66c2a5")


def _cold(plt: Any, res: dict[str, Any]) -> Any:
    """Stacked phases of the median run of every variant, one panel per model."""
    fig, axes = plt.subplots(1, len(res), figsize=(6 * len(res), 4.8), squeeze=False)
    for ax, (model, r) in zip(axes[0], res.items(), strict=True):
        v = r["variants"]
        labels = list(v)
        for x, variant in enumerate(labels):
            run = v[variant]["median_run"]
            if not run:
                continue
            values, _ = phase_parts(variant, run)
            if values[0] is None:
                parts = [("not instrumented: spawn → first infer", run["e2e_ms"], "#a6d854")]
            else:
                parts = [
                    (label, value or 0.0, colour)
                    for label, value, colour in zip(PHASE_COLUMNS, values, _PHASE_COLOURS, strict=True)
                ]
            bottom = 0.0
            for lab, val, colour in parts:
                ax.bar(x, val, bottom=bottom, color=colour, label=lab, edgecolor="white", linewidth=0.5)
                bottom += val
            med = v[variant]["median_ms"]
            ax.text(
                x,
                run["e2e_ms"] * 1.01,
                f"median of {v[variant]['n']}: {med:.0f} ms",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("ms from process spawn to the first successful infer\n(median run of each variant)")
        ax.set_title(f"Cold start of {model}: where the time goes")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
        handles, labs = ax.get_legend_handles_labels()
        uniq = dict(zip(labs, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    return fig


def _overhead(plt: Any, res: dict[str, Any]) -> Any:
    """p50 and p99 of every path."""
    paths = res["paths"]
    keys = list(paths)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [paths[k]["p50_us"] for k in keys], 0.4, label="p50")
    ax.bar(x + 0.2, [paths[k]["p99_us"] for k in keys], 0.4, label="p99")
    ax.set_xticks(x, [OVERHEAD_LABELS[k].replace(", ", "\n").replace(" (", "\n(") for k in keys], fontsize=7)
    ax.set_ylabel("latency (µs)")
    ax.set_title(f"Per-request latency, c=1: {res['model']}")
    ax.legend()
    return fig


def _throughput(plt: Any, res: dict[str, Any]) -> Any:
    """req/s (top) and latency (bottom) vs concurrency, one column per model."""
    fig, axes = plt.subplots(2, len(res), figsize=(6 * len(res), 8), squeeze=False)
    for col, r in enumerate(res.values()):
        for kind, marker, colour in (("oclaw", "o", "tab:blue"), ("naive", "s", "tab:orange")):
            pts = [p for p in r["points"][kind] if "error" not in p and p.get("p50_us") is not None]
            cs = [p["concurrency"] for p in pts]
            axes[0][col].plot(cs, [p["rps"] for p in pts], marker=marker, color=colour, label=kind)
            axes[1][col].plot(cs, [p["p99_us"] / 1e3 for p in pts], marker=marker, color=colour, label=f"{kind} p99")
            axes[1][col].plot(
                cs,
                [p["p50_us"] / 1e3 for p in pts],
                marker=marker,
                color=colour,
                linestyle="--",
                alpha=0.5,
                label=f"{kind} p50",
            )
        axes[0][col].set_title(r["label"], fontsize=10)
        axes[0][col].set_ylabel("req/s")
        axes[0][col].set_ylim(bottom=0)
        axes[1][col].set_ylabel("latency (ms, log)")
        axes[1][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 8, 32], ["1", "8", "32"])
            ax.set_xlabel("concurrency")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return fig


#: section -> (file name, drawing function)
PLOTS: dict[str, tuple[str, Callable[[Any, dict[str, Any]], Any]]] = {
    "cold": ("cold_start.png", _cold),
    "overhead": ("overhead.png", _overhead),
    "throughput": ("throughput.png", _throughput),
}


def plot_all(results: dict[str, Any], out: Path) -> list[str]:
    """Draw the plot of every section in ``results``; returns the names of the files written into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for section, (name, draw) in PLOTS.items():
        if section not in results:
            continue
        fig = draw(plt, results[section])
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p.name)
    return written
