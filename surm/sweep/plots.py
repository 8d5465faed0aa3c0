"""The Pareto plot of a sweep: test metric against trainable parameters (log x), one panel per
dataset, each method at its tuned values chosen on validation."""
from __future__ import annotations

import math
import pathlib
import statistics
from typing import Sequence

from surm.sweep import results, selection
from surm.sweep.grid import structure_of


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with as few or fewer parameters."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _name(key: tuple) -> str:
    """A method's colour: its structure, or the method where it has none."""
    return structure_of(key[2]) or key[1]


def plot_pareto(rows: Sequence[dict], path: pathlib.Path, tune_seed: int | None = None,
                title: str = "") -> bool:
    """Writes the plot; False if no method has a chosen run yet."""
    groups = results.group(selection.select(rows, tune_seed))
    if not groups:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({key[0] for key in groups})
    names = sorted({_name(key) for key in groups})
    colours = plt.get_cmap("tab10")
    markers = "os^Dv<>phX*P"
    style = {f: (colours(i % 10), markers[i % len(markers)]) for i, f in enumerate(names)}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        points, metric = [], ""
        for key, runs in groups.items():
            ds, method, _, hparams = key
            if ds != dataset:
                continue
            x = runs[0]["trainable"]
            ys = [r["test"] for r in runs]
            y = statistics.mean(ys)
            colour, marker = style[_name(key)]
            ax.errorbar(x, y, yerr=statistics.stdev(ys) if len(ys) > 1 else None, color=colour,
                        marker=marker, linestyle="none", capsize=2,
                        markerfacecolor="none" if method == "adapter" else colour)
            ax.annotate(" ".join(filter(None, [hparams, method if _name(key) != method else ""])),
                        (x, y),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
            points.append((x, y))
            metric = runs[0]["metric"]
        front = pareto_front(points)
        ax.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{title} {dataset}".strip())
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"test {metric} (lr chosen on validation)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="none", label=f)
               for f, (c, m) in style.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               title="structure or method (hollow: adapters; dashed: Pareto front)",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True
