"""The ``process`` step's plots (PNGs in the run folder, outputs named ``plot_*``): files per
modality in vs kept, rejects per reason, duplicate image groups as thumbnails, and a 2-D PCA
projection of the embeddings. Drawn on the driver from the run's metrics, a few source images
and a bounded read of the ``embedding`` columns, all through :mod:`pipelines.io`."""
from __future__ import annotations

import textwrap

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipelines.io import filesystem_for, join
from pipelines.report import plot_bars, plot_images, plot_scatter

from .config import MODALITIES, MultimodalConfig
from .images import ImageError, decode_pillow, fit
from .sources import FileTooLarge, read_bytes

PLOTS = ("plot_files", "plot_rejects", "plot_duplicates", "plot_embeddings")
MAX_REASONS = 4           # more reasons are summed into "other" (labels must fit)
MAX_GROUPS, MAX_MEMBERS = 4, 5  # duplicate groups shown, images per group
THUMB = 96                # thumbnail side (px)
MAX_THUMB_BYTES = 16 << 20  # larger sources are skipped
MAX_POINTS = 1000         # embeddings per modality in the projection


def write_plots(cfg: MultimodalConfig, out_dir: str, outputs: dict[str, str], metrics: dict,
                dup_groups: list[list[tuple[str, str]]]) -> dict[str, str]:
    """Write the four plots into ``out_dir``; returns ``{plot_name: uri}``."""
    path = {name: join(out_dir, f"{name}.png") for name in PLOTS}
    files = {}
    for m in MODALITIES:
        files[f"{m[:5]}\nin"] = metrics["files_in_by_modality"][m]
        files[f"{m[:5]}\nkept"] = metrics["files_kept_by_modality"][m]
    points = embedding_points(outputs)
    groups = metrics["duplicates"]["images"].get("groups_with_duplicates", 0)
    return {
        "plot_files": plot_bars(path["plot_files"], files, "files", "files per modality: in vs kept"),
        "plot_rejects": plot_bars(path["plot_rejects"], reject_bars(metrics["rejects_by_reason"]), "rejects",
                                  f"rejects per reason ({sum(metrics['rejects_by_reason'].values())})",
                                  horizontal=True),
        "plot_duplicates": plot_images(path["plot_duplicates"], thumbnails(cfg, dup_groups),
                                       f"duplicate image groups: {len(dup_groups)} of {groups}" if dup_groups
                                       else "no duplicate images"),
        "plot_embeddings": plot_scatter(path["plot_embeddings"], points, "PC 1", "PC 2",
                                        "embeddings, PCA" if points else "no embeddings"),
    }


def reject_bars(by_reason: dict[str, int]) -> dict[str, int]:
    """Bars for the largest reason classes (numbered, wrapped labels), the rest as ``other``."""
    ranked = sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked if len(ranked) <= MAX_REASONS + 1 else ranked[:MAX_REASONS]  # "other" only for 2+
    bars = {textwrap.fill(f"{i + 1}. " + textwrap.shorten(reason, 44, placeholder="…"), 24): n
            for i, (reason, n) in enumerate(shown)}
    if len(shown) < len(ranked):
        bars["other"] = sum(n for _, n in ranked[len(shown):])
    return bars


def duplicate_groups(dups: dict[str, dict]) -> list[list[tuple[str, str]]]:
    """The first ``MAX_GROUPS`` groups with duplicates (in path order): ``[(path, kind)]`` each,
    the representative first (kind ``first``), at most ``MAX_MEMBERS`` members."""
    groups: dict[int, list[tuple[str, str]]] = {}
    for key in sorted(dups):
        groups.setdefault(dups[key]["dup_group"], []).append((key, dups[key]["dup_kind"] or "first"))
    return [members[:MAX_MEMBERS] for members in groups.values() if len(members) > 1][:MAX_GROUPS]


def thumbnails(cfg: MultimodalConfig, groups: list[list[tuple[str, str]]]) -> list[list[tuple[str, np.ndarray]]]:
    """One row of square thumbnails per group, read from the source files (unreadable ones skipped)."""
    rows = []
    for members in groups:
        row = []
        for path, kind in members:
            try:
                rgb = decode_pillow(read_bytes(path, cfg.input.endpoint, MAX_THUMB_BYTES), THUMB)[0]
            except (ImageError, FileTooLarge, OSError):
                continue
            row.append((f"{kind}\n{path.rsplit('/', 1)[-1]}", fit(rgb, THUMB)))
        rows.append(row)
    return rows


def embedding_points(outputs: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """First two principal components (NumPy SVD) of up to ``MAX_POINTS`` embeddings per
    modality, by modality; embeddings of different sizes are zero-padded to the largest."""
    parts = {m: emb for m in MODALITIES if m in outputs and len(emb := read_embeddings(outputs[m], MAX_POINTS))}
    if not parts:
        return {}
    dim = max(e.shape[1] for e in parts.values())
    x = np.concatenate([np.pad(e, ((0, 0), (0, dim - e.shape[1]))) for e in parts.values()]).astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = np.pad(x @ vt[:2].T, ((0, 0), (0, max(0, 2 - len(vt)))))  # one point: one component
    bounds = np.cumsum([0] + [len(e) for e in parts.values()])
    return {m: (xy[a:b, 0], xy[a:b, 1]) for m, a, b in zip(parts, bounds[:-1], bounds[1:])}


def read_embeddings(uri: str, limit: int) -> np.ndarray:
    """Up to ``limit`` non-null rows of an output's ``embedding`` column as ``(n, dim)`` float32."""
    fs, path = filesystem_for(uri)
    col = pads.dataset(path, filesystem=fs, format="parquet").head(limit, columns=["embedding"]).column(0)
    col = pc.drop_null(col.combine_chunks())
    if not len(col):
        return np.zeros((0, 0), np.float32)
    return col.flatten().to_numpy().reshape(len(col), col.type.list_size).astype(np.float32)
