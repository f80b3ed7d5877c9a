"""Run summaries (the JSON line every entry point prints last) and PNG plots, written through
:mod:`pipelines.io` (local folders and object storage alike)."""
from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .io import join, write_bytes


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary(template: str, step: str, run_dir: str, outputs: Mapping[str, str] | None = None,
            metrics: Mapping | None = None, rejects: int = 0, **extra) -> dict:
    """The run contract: template, step, run_dir, outputs, metrics, rejects."""
    return _jsonable({
        "template": template, "step": step, "run_dir": str(run_dir),
        "outputs": dict(outputs or {}), "metrics": dict(metrics or {}),
        "rejects": int(rejects), **extra,
    })


def write_summary(result: dict, name: str = "summary.json") -> str | None:
    """Write ``summary.json`` (``<step>_summary.json`` for one step) into the run folder, local or
    object storage."""
    run_dir = result.get("run_dir", "")
    if not run_dir:
        return None
    uri = join(run_dir, f"{result['step']}_{name}" if result.get("step") not in (None, "all") else name)
    return write_bytes(uri, json.dumps(result, indent=2).encode())


def emit(result: dict) -> None:
    """Write the summary file and print the summary as the last stdout line."""
    write_summary(result)
    print(json.dumps(result), flush=True)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, uri: str | Path) -> str:
    """Write the figure as PNG to ``uri`` (local path or object-store URI)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes(str(uri), buf.getvalue())


def plot_lines(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str, ylabel: str, title: str, diagonal: bool = False, log_y: bool = False) -> str:
    """One PNG with a line per named (x, y) series."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, marker="o" if len(x) <= 30 else None, markersize=3)
    if diagonal:
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if series:
        ax.legend(loc="best")
    return _save(plt, fig, path)


def plot_panels(path: str | Path, panels: Sequence[tuple[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]],
                xlabel: str, title: str, steps: set[str] = frozenset()) -> str:
    """One PNG of panels stacked on a shared x axis (e.g. time), each ``(ylabel, {name: (x, y)})`` with a line
    per named series; panels named in ``steps`` draw counts as steps on whole numbers (replicas, nodes), each
    series in its own dash and width so that equal counts stay visible."""
    from matplotlib.ticker import MaxNLocator

    plt = _figure()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels) + 0.6), dpi=100, sharex=True,
                             squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        for i, (name, (x, y)) in enumerate(series.items()):
            if ylabel in steps:
                ax.step(x, y, where="post", label=name, linestyle=("-", "--", ":")[i % 3], linewidth=3.5 - i)
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                ax.plot(x, y, label=name, marker="o" if len(x) <= 30 else None, markersize=3)
        ax.set(ylabel=ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(loc="best", fontsize="small")
    axes[-1, 0].set(xlabel=xlabel)
    axes[0, 0].set(title=title)
    return _save(plt, fig, path)


def plot_bars(path: str | Path, values: Mapping[str, float], ylabel: str, title: str,
              horizontal: bool = False) -> str:
    """One PNG bar chart of named values (``horizontal`` for long names: reasons, features)."""
    plt = _figure()
    lines = max((str(k).count("\n") + 1 for k in values), default=1)  # wrapped labels need room per bar
    fig, ax = plt.subplots(figsize=(7 if horizontal else 5, max(4, 0.28 * lines * len(values) + 1) if horizontal
                                    else 4), dpi=100)
    if horizontal:
        ax.barh(list(values)[::-1], [float(v) for v in values.values()][::-1])
        ax.set(xlabel=ylabel, title=title)
    else:
        ax.bar(list(values), [float(v) for v in values.values()])
        ax.set(ylabel=ylabel, title=title)
    return _save(plt, fig, path)


def plot_hist(path: str | Path, groups: Mapping[str, Sequence[float]], xlabel: str, title: str,
              bins: int = 40, log_y: bool = False) -> str:
    """One PNG of overlaid, density-normalised histograms, one per named group (e.g. scores by label)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    values = [np.asarray(v, dtype=float) for v in groups.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    edges = np.histogram_bin_edges(finite if finite.size else [0.0, 1.0], bins=bins)
    for name, v in zip(groups, values):
        ax.hist(v[np.isfinite(v)], bins=edges, alpha=0.5, density=True, label=f"{name} ({v.size})")
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(loc="best")
    return _save(plt, fig, path)


def plot_scatter(path: str | Path, points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 xlabel: str, ylabel: str, title: str) -> str:
    """One PNG scatter plot, one colour per named group of (x, y) points (e.g. a 2-D projection)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, (x, y) in points.items():
        ax.scatter(x, y, s=12, alpha=0.7, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if len(points) > 1:
        ax.legend(loc="best", fontsize="small")
    return _save(plt, fig, path)


def plot_images(path: str | Path, rows: Sequence[Sequence[tuple[str, np.ndarray]]], title: str) -> str:
    """One PNG grid of small images: ``rows`` of ``(caption, HxW[x3] uint8 array)`` (e.g. duplicate
    groups, camera frames)."""
    plt = _figure()
    ncols = max((len(r) for r in rows), default=1) or 1
    fig, axes = plt.subplots(max(len(rows), 1), ncols, figsize=(2 * ncols, 2 * max(len(rows), 1)), dpi=100,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, row in enumerate(rows):
        for j, (caption, image) in enumerate(row):
            axes[i][j].imshow(image, cmap=None if np.ndim(image) == 3 else "gray")
            axes[i][j].set_title(str(caption)[:24], fontsize=8)
    fig.suptitle(title)
    return _save(plt, fig, path)
