"""What ``oclaw optimize`` shows: a table of every configuration tried, a summary of what was written and, on
request, a plot of the metric against latency (matplotlib, from the ``bench`` extra, imported only then)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.optimize.optimizer import Outcome

PLOT_HINT = "--report draws its plot with matplotlib: pip install 'oclaw[bench]'"


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on a file-only backend, or a ConfigError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(PLOT_HINT) from None
    return plt


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.3g}"


def table(outcome: Outcome) -> str:
    """A Markdown table: the source, then each configuration tried, the chosen one marked."""
    budget = outcome.budget
    lines = [
        f"| # | configuration | fp32 nodes | {budget.metric.name} | drop | latency ms | size kB "
        f"| within {budget.max_drop:g} |",
        "|---|---|---|---|---|---|---|---|",
        f"| | source (fp32) | all | {_number(budget.source)} | - | {outcome.source_latency_ms:.3f} "
        f"| {outcome.source_bytes / 1e3:.1f} | - |",
    ]
    for number, trial in enumerate(outcome.trials, 1):
        mark = "yes, chosen" if trial is outcome.chosen else "yes" if trial.holds else "no"
        lines.append(
            f"| {number} | {trial.family.label} | {len(trial.excluded)} | {_number(trial.value)} "
            f"| {_number(trial.drop)} | {trial.latency_ms:.3f} | {trial.bytes / 1e3:.1f} | {mark} |"
        )
    return "\n".join(lines)


def summary(outcome: Outcome, path: Path) -> str:
    """One line: what was written where, and what it changed."""
    record = outcome.record
    metric, latency, size = record["metric"], record["latency_ms"], record["size_bytes"]
    kept = len(record["nodes_fp32"])
    return (
        f"wrote {path} ({record['method']}, {kept} node(s) kept in fp32): {metric['name']} {metric['source']} -> "
        f"{metric['optimized']}, latency {latency['source']} -> {latency['optimized']} ms, "
        f"size {size['source'] / 1e3:.1f} -> {size['optimized'] / 1e3:.1f} kB"
    )


def write_report(folder: Path, outcome: Outcome) -> list[Path]:
    """``configurations.json`` and ``metric_latency.png`` (every configuration tried) in ``folder``."""
    plt = require_matplotlib()
    budget = outcome.budget
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / "configurations.json"
    data = {
        "metric": budget.metric.name,
        "source": {"value": budget.source, "latency_ms": outcome.source_latency_ms, "bytes": outcome.source_bytes},
        "max_drop": budget.max_drop,
        "tried": [t.row() for t in outcome.trials],
    }
    listing.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([outcome.source_latency_ms], [budget.source], marker="*", s=160, color="black", label="source (fp32)")
    for holds, colour, label in ((True, "tab:green", "within budget"), (False, "tab:red", "over budget")):
        shown = [t for t in outcome.trials if t.holds is holds and math.isfinite(t.value)]
        ax.scatter([t.latency_ms for t in shown], [t.value for t in shown], color=colour, label=label)
    for number, t in enumerate(outcome.trials, 1):  # the table's row numbers
        if math.isfinite(t.value):
            ax.annotate(str(number), (t.latency_ms, t.value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    chosen = outcome.chosen
    if chosen is not None:
        ax.scatter([chosen.latency_ms], [chosen.value], s=220, facecolors="none", edgecolors="black", label="chosen")
    sign = -1 if budget.metric.higher_is_better else 1
    limit = budget.source + sign * budget.max_drop
    ax.axhline(limit, linestyle="--", color="grey", label=f"budget ({'>=' if sign < 0 else '<='} {limit:.4g})")
    ax.set_xlabel("batch-1 latency on this CPU (ms)")
    ax.set_ylabel(budget.metric.name)
    ax.set_title(f"{outcome.name}: every configuration tried (numbered as in the table)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    plot = folder / "metric_latency.png"
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    return [listing, plot]
