"""Assemble and run the multimodal ETL: list -> route -> per-modality decode + embed
(Ray Data, streaming) -> dataset-wide dedup -> Parquet outputs, rejects and metrics.

The template's steps (``template.py``): ``sample`` (:func:`generate_sample`, the mixed-media
sample written into the run folder when no input is configured) and ``process``
(:func:`process`: routing, per-modality decode/embed, dedup and the writes, one streaming pass
with no intermediate dataset that a separate step could read).

Each modality runs in two passes so that duplicates are found across the whole dataset:
pass 1 (distributed, Ray Data) decodes, computes features and embeddings and writes a
staging folder; pass 2 (driver, streaming file by file) groups duplicates from the small
hash columns and rewrites the good rows with the stable output schema
(:func:`output_schemas`: features + embeddings, no pixels), sending failed rows to
``rejects``.
"""
from __future__ import annotations

import re
import shutil
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.cli import RunFailed
from pipelines.input import REASON
from pipelines.io import every_cpu_to_work, filesystem_for, reject, rejects_table, replace_dir, write_table
from pipelines.progress import progress
from pipelines.template import Run, StepResult, require_cluster_readable

from . import dedup
from .audio import AudioDecoder, embed_frames
from .batches import ok_mask
from .config import MODALITIES, MultimodalConfig, is_manifest
from .embed import embed_stage, input_column
from .images import ImageDecoder
from .report import duplicate_groups, write_plots
from .sources import MANIFEST_SCHEMA, ROUTED_SCHEMA, Manifest, Router, blocks, list_files, read_manifest
from .text import TextReader
from .video import VideoDecoder

REJECT_SCHEMA = pa.schema([("path", pa.string()), ("modality", pa.string()),
                           ("stage", pa.string()), ("reason", pa.string())])
DUP_FIELDS = [("dup_group", pa.int64()), ("dup_of", pa.string()), ("dup_kind", pa.string())]


def output_schemas(cfg: MultimodalConfig) -> dict[str, pa.Schema]:
    """The documented, stable output schema of each modality dataset."""
    def emb(dim: int):
        return ("embedding", pa.list_(pa.float32(), dim))

    return {
        "images": pa.schema([("path", pa.string()), ("format", pa.string()), ("width", pa.int32()),
                             ("height", pa.int32()), ("mode", pa.string()), ("blur", pa.float32()),
                             ("brightness", pa.float32()), ("phash", pa.string()), ("sha256", pa.string()),
                             *DUP_FIELDS, emb(cfg.images.embed.dim)]),
        "video": pa.schema([("path", pa.string()), ("clip", pa.int32()), ("shot", pa.int32()),
                            ("start_s", pa.float32()), ("end_s", pa.float32()), ("duration_s", pa.float32()),
                            ("fps", pa.float32()), ("width", pa.int32()), ("height", pa.int32()),
                            ("video_duration_s", pa.float32()), ("n_sampled", pa.int32()),
                            ("brightness", pa.float32()), ("motion", pa.float32()), emb(cfg.video.embed.dim)]),
        "audio": pa.schema([("path", pa.string()), ("format", pa.string()), ("duration_s", pa.float32()),
                            ("source_rate", pa.int32()), ("channels", pa.int32()),
                            ("loudness_dbfs", pa.float32()), ("peak", pa.float32()),
                            ("silence_ratio", pa.float32()),
                            ("logmel_mean", pa.list_(pa.float32(), cfg.audio.n_mels)), emb(cfg.audio.embed.dim)]),
        "text": pa.schema([("path", pa.string()), ("record", pa.int64()), ("text", pa.string()),
                           ("encoding", pa.string()), ("n_chars", pa.int64()), ("n_words", pa.int64()),
                           ("n_lines", pa.int64()), ("script", pa.string()), ("sha256", pa.string()),
                           *DUP_FIELDS, emb(cfg.text.embed.dim)]),
    }


def reserved_names(cfg: MultimodalConfig) -> set[str]:
    """Column names a manifest's own column cannot keep (it is carried as ``manifest_<name>``): every
    output column, plus the manifest's and the rejects' bookkeeping."""
    names = {n for schema in output_schemas(cfg).values() for n in schema.names}
    return names | set(MANIFEST_SCHEMA.names) | set(REJECT_SCHEMA.names) | {REASON, "reject_id"}


def output_schema(cfg: MultimodalConfig, modality: str, manifest: Manifest | None = None) -> pa.Schema:
    """A modality's output schema: :func:`output_schemas`, then the manifest's own columns."""
    schema = output_schemas(cfg)[modality]
    return pa.schema([*schema, *manifest.extra_fields()]) if manifest is not None else schema


# ------------------------------------------------------------------ sources
def listing(cfg: MultimodalConfig, input_path: str | None) -> tuple[pa.Table, Manifest | None]:
    """Paths and sizes of the files to process, plus the manifest (its label/metadata columns and
    rejected rows) when ``input.path`` is one; else every file under the folder/prefix."""
    if cfg.input.path and is_manifest(cfg.input.path, cfg.input.format):
        manifest = read_manifest(cfg.input, reserved_names(cfg), cfg.input.endpoint)
        return manifest.files, manifest
    return list_files(input_path or cfg.input.path, cfg.input.endpoint), None


def route(cfg: MultimodalConfig, files: pa.Table) -> pa.Table:
    """Route every file (in Ray tasks: reading the first bytes of each) -> ROUTED_SCHEMA table."""
    import ray

    if files.num_rows == 0:
        return ROUTED_SCHEMA.empty_table()
    ds = ray.data.from_arrow(blocks(files, cfg.route.files_per_block)).map_batches(
        Router(cfg.route.sniff_bytes, cfg.input.endpoint), batch_format="pyarrow",
        batch_size=None, num_cpus=cfg.route.num_cpus)
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables).cast(ROUTED_SCHEMA).sort_by("path") if tables else ROUTED_SCHEMA.empty_table()


# ------------------------------------------------------------------ pass 1
def build_modality(cfg: MultimodalConfig, modality: str, files: pa.Table):
    """The lazy Ray Dataset for one modality: decode/features tasks, then the embedding actor
    pool. Decode tasks reserve ``memory_mb`` (their bounded working set), which also keeps
    Ray Data from fusing them into the embedding actors: decoding scales with the CPUs, not
    with the actor pool size."""
    import ray

    ep = cfg.input.endpoint
    if modality == "images":
        c = cfg.images
        ds = ray.data.from_arrow(blocks(files, c.batch_size)).map_batches(
            ImageDecoder(c.size, c.analysis_size, c.decoder, ep, c.embed.enabled), batch_size=c.batch_size,
            batch_format="numpy", **decode_args(cfg, modality))
        return embed_stage(ds, "images", c.embed, (c.size, c.size, 3))
    if modality == "video":
        c = cfg.video
        ds = ray.data.from_arrow(blocks(files, 1)).map_batches(
            VideoDecoder(c.sample_fps, c.frame_size, c.frames_per_clip, c.max_clip_s, c.shot_threshold,
                         c.max_seconds, ep, c.embed.enabled),
            batch_size=1, batch_format="numpy", **decode_args(cfg, modality))
        return embed_stage(ds, "video", c.embed, (c.frames_per_clip, c.frame_size, c.frame_size, 3))
    if modality == "audio":
        c = cfg.audio
        ds = ray.data.from_arrow(blocks(files, c.batch_size)).map_batches(
            AudioDecoder(c.sample_rate, c.n_mels, c.silence_db, c.max_seconds, c.embed_seconds, ep,
                         input_column("audio", c.embed.model) if c.embed.enabled else None),
            batch_size=c.batch_size, batch_format="numpy", **decode_args(cfg, modality))
        return embed_stage(ds, "audio", c.embed, (embed_frames(c.embed_seconds), c.n_mels),
                           sample_rate=c.sample_rate)
    if modality == "text":
        c = cfg.text
        ds = ray.data.from_arrow(blocks(files, c.batch_size)).map_batches(
            TextReader(c.encodings, c.jsonl_field, c.shingle, c.min_chars, c.max_chars, ep,
                       max_bytes=int(c.max_file_mb * (1 << 20))),
            batch_size=c.batch_size, batch_format="numpy", **decode_args(cfg, modality))
        return embed_stage(ds, "text", c.embed, (c.max_tokens,), max_tokens=c.max_tokens)
    raise ValueError(f"unknown modality {modality!r}")


def decode_args(cfg: MultimodalConfig, modality: str) -> dict:
    """Ray resources of a modality's decode tasks."""
    c = getattr(cfg, modality)
    return {"num_cpus": c.num_cpus, "memory": c.memory_mb << 20}


def write_staging(ds, uri: str, remote_args: dict) -> None:
    """Execute pass 1 into a fresh staging folder. Given the decode tasks' resources as
    ``remote_args`` (no embedding stage), Ray Data fuses decode and write into one task, and that
    task may use every CPU (:func:`pipelines.io.every_cpu_to_work`: with Ray Data's per-operator
    reservation 1.25 of 2 decode tasks ran on average, 1.8 without)."""
    _remove(uri)
    fs, path = filesystem_for(uri)
    if remote_args:
        every_cpu_to_work(ds)
    ds.write_parquet(path, filesystem=fs, ray_remote_args=remote_args or None)


# ------------------------------------------------------------------ pass 2
def staging_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a staging folder, sorted."""
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return fs, []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return fs, sorted(i.path for i in infos if i.path.endswith(".parquet"))


def to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Columns as NumPy arrays (Ray's tensor columns become n-d arrays)."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if isinstance(col.type, pa.ExtensionType):
            chunks = [c.to_numpy() for c in col.chunks if len(c)]
            out[name] = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def collect(uri: str, columns: list[str], label: str = "collect") -> dict[str, np.ndarray]:
    """Selected (small) columns of a staging folder, read file by file on the driver (progress
    lines under ``label`` on a terminal)."""
    fs, files = staging_files(uri)
    parts = [to_numpy(pq.read_table(f, columns=columns, filesystem=fs))
             for f in progress(files, label, unit="staging files")]
    return {c: np.concatenate([p[c] for p in parts]) if parts else np.array([], dtype=object) for c in columns}


def dup_columns(cfg: MultimodalConfig, modality: str, cols: dict[str, np.ndarray]) -> dict[str, dict]:
    """Duplicate groups of the good rows, keyed by row key (path, or path#record for JSONL)."""
    ok = ok_mask(cols["reason"])
    if modality == "images":
        keys = [str(p) for p in cols["path"][ok]]
        groups = dedup.group_images(keys, [str(s) for s in cols["sha256"][ok]],
                                    [str(h) for h in cols["phash"][ok]], cfg.images.near_dup_hamming)
    else:
        keys = [row_key(p, r) for p, r in zip(cols["path"][ok], cols["record"][ok])]
        sigs = np.stack([np.frombuffer(b, np.uint64) for b in cols["minhash"][ok]]) if ok.any() \
            else np.zeros((0, 1), np.uint64)
        pairs = dedup.minhash_near_pairs(sigs, cfg.text.near_dup_jaccard)
        groups = dedup.group(keys, [str(s) for s in cols["sha256"][ok]], pairs)
    return {k: {c: groups[c][i] for c in groups} for i, k in enumerate(keys)}


def row_key(path, record) -> str:
    """Row identity for duplicate bookkeeping: the path, plus ``#record`` for JSONL lines."""
    return f"{path}#{int(record)}" if str(path).lower().endswith(".jsonl") else str(path)


def finalize_batch(batch: dict[str, np.ndarray], schema: pa.Schema, dups: dict | None,
                   manifest: Manifest | None = None) -> pa.Table:
    """Keep the good rows of a staging batch, add duplicate columns and cast to ``schema``
    (embeddings become fixed-size float32 lists); with a ``manifest``, its label/metadata columns
    follow, each row getting the values of the manifest row of its file."""
    ok = ok_mask(batch["reason"])
    arrays = []
    carried = manifest.carried(batch["path"][ok]) if manifest is not None else None
    for field in schema:
        if carried is not None and field.name in carried.column_names:
            arrays.append(carried.column(field.name).combine_chunks().cast(field.type))
        elif field.name in ("dup_group", "dup_of", "dup_kind"):
            records = batch["record"][ok] if "record" in batch else [0] * int(ok.sum())
            keys = [row_key(p, r) for p, r in zip(batch["path"][ok], records)]
            arrays.append(pa.array([dups[k][field.name] for k in keys], field.type))
        elif pa.types.is_fixed_size_list(field.type):
            arrays.append(_fixed_list(batch.get(field.name), ok, field.type))
        else:
            arrays.append(pa.array(list(batch[field.name][ok]), field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def finalize(staging: str, target: str, schema: pa.Schema, dups: dict | None,
             manifest: Manifest | None = None, label: str = "finalize") -> None:
    """Rewrite a staging folder into ``target`` (replacing it), one staging file at a time,
    so memory stays bounded by the largest staging file (progress lines under ``label`` on a
    terminal: :mod:`pipelines.progress`)."""
    fs, files = staging_files(staging)
    out_fs, out_path = filesystem_for(target)

    def write(folder: str) -> None:
        with pq.ParquetWriter(f"{folder}/part-0.parquet", schema, filesystem=out_fs) as writer:
            for f in progress(files, label, unit="staging files"):
                writer.write_table(finalize_batch(to_numpy(pq.read_table(f, filesystem=fs)), schema, dups,
                                                  manifest))

    replace_dir(out_fs, out_path, write)


def _fixed_list(values, ok: np.ndarray, typ: pa.FixedSizeListType) -> pa.Array:
    n = int(ok.sum())
    if values is None:
        return pa.nulls(n, typ)
    flat = np.ascontiguousarray(np.stack(list(np.asarray(values)[ok])) if n else np.zeros((0, typ.list_size)),
                                np.float32)
    if flat.size != n * typ.list_size:
        raise ValueError(f"column has width {flat.size // max(n, 1)}, schema says {typ.list_size}")
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), typ.list_size)


def reject_rows(modality: str, cols: dict[str, np.ndarray]) -> list[dict]:
    """Rejects records (stage ``decode``) for the failed rows of a staging folder."""
    out = []
    for i, bad in enumerate(~ok_mask(cols["reason"])):
        if bad:
            reason = str(cols["reason"][i])
            path = str(cols["path"][i])
            if "record" in cols and int(cols["record"][i]) > 0:
                path = row_key(path, cols["record"][i])
            r = reject(path, "decode", reason, modality=modality)
            out.append({"path": r["id"], "modality": modality, "stage": r["stage"], "reason": r["reason"]})
    return out


def _remove(uri: str) -> None:
    fs, path = filesystem_for(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.rmtree(path, ignore_errors=True)
    elif fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


# ------------------------------------------------------------------ run
def run_modality(cfg: MultimodalConfig, modality: str, files: pa.Table, out_dir: str,
                 manifest: Manifest | None = None) -> dict:
    """Pass 1 + pass 2 for one modality; returns counts, rejects, duplicates and timings. With a
    ``manifest``, its label/metadata columns are appended to the output (:func:`output_schema`)."""
    schema = output_schema(cfg, modality, manifest)
    target = f"{out_dir}/{modality}"
    if files.num_rows == 0:
        write_table(schema.empty_table(), target)
        return {"files": 0, "rows": 0, "kept_files": 0, "rejects": [], "duplicates": {}, "dup_groups": [],
                "stages": {}}
    staging = f"{out_dir}/_staging/{modality}"
    t0 = time.perf_counter()
    fuse_write = not _embeds(cfg, modality)  # decode -> write: one task when no actor stage between
    write_staging(build_modality(cfg, modality, files), staging, decode_args(cfg, modality) if fuse_write else {})
    pass1 = time.perf_counter() - t0
    small = ["path", "reason", "decode_s"] + (["embed_s"] if _embeds(cfg, modality) else [])
    small += {"images": ["sha256", "phash"], "text": ["record", "sha256", "minhash"]}.get(modality, [])
    cols = collect(staging, small, f"{modality}: read keys")
    t1 = time.perf_counter()
    dups = dup_columns(cfg, modality, cols) if modality in ("images", "text") else None
    finalize(staging, target, schema, dups, manifest, f"{modality}: write")
    pass2 = time.perf_counter() - t1
    _remove(staging)
    good = ok_mask(cols["reason"])
    kinds = Counter(d["dup_kind"] for d in (dups or {}).values() if d["dup_kind"])
    groups = Counter(d["dup_group"] for d in (dups or {}).values())
    stages = {
        "decode": _stage(len(good), float(cols["decode_s"].sum())),
        "pipeline": {"files": files.num_rows, "wall_s": round(pass1, 3),
                     "files_per_s": round(files.num_rows / pass1, 2) if pass1 else None},
        "finalize": {"rows": int(good.sum()), "wall_s": round(pass2, 3)},
    }
    if "embed_s" in cols:
        stages["embed"] = _stage(int(good.sum()), float(cols["embed_s"][good].sum()))
    return {
        "files": files.num_rows, "rows": int(good.sum()), "kept_files": len(set(cols["path"][good])),
        "rejects": reject_rows(modality, cols),
        "duplicates": {"exact": kinds.get("exact", 0), "near": kinds.get("near", 0),
                       "groups_with_duplicates": sum(1 for c in groups.values() if c > 1)} if dups is not None else {},
        "dup_groups": duplicate_groups(dups) if modality == "images" else [],
        "stages": stages,
    }


def _embeds(cfg: MultimodalConfig, modality: str) -> bool:
    return getattr(cfg, modality).embed.enabled


def _stage(items: int, busy_s: float) -> dict:
    """Items, summed per-item busy seconds, and items per busy second (one worker's rate)."""
    return {"items": items, "busy_s": round(busy_s, 3),
            "items_per_busy_s": round(items / busy_s, 2) if busy_s > 0 else None}


def reason_class(reason: str) -> str:
    """Reason with numbers and quoted names blanked, so similar rejects count together."""
    return re.sub(r"\d+(\.\d+)?", "N", re.sub(r"'[^']*'", "'…'", reason))[:120]


def etl(cfg: MultimodalConfig, out_dir: str, input_path: str | None = None) -> dict:
    """List, route and process every modality; write outputs; return metrics and outputs."""
    t0 = time.perf_counter()
    files, manifest = listing(cfg, input_path)
    routed = route(cfg, files)
    t_route = time.perf_counter() - t0
    rejects = list(manifest.rejects) if manifest is not None else []  # unusable manifest rows
    for rec in routed.filter(pc.is_valid(routed.column("reason"))).to_pylist():
        r = reject(rec["path"], "route", rec["reason"])
        rejects.append({"path": r["id"], "modality": rec["modality"], "stage": "route", "reason": r["reason"]})
    good = routed.filter(pc.is_null(routed.column("reason")))
    results, outputs = {}, {}
    for modality in MODALITIES:
        subset = good.filter(pc.equal(good.column("modality"), modality))
        if modality not in cfg.modalities:
            rejects += [{"path": p, "modality": modality, "stage": "route", "reason": f"modality {modality} disabled"}
                        for p in subset.column("path").to_pylist()]
            subset = subset.slice(0, 0)
        results[modality] = run_modality(cfg, modality, subset.select(["path", "size", "format"]), out_dir,
                                         manifest)
        rejects += results[modality]["rejects"]
        outputs[modality] = f"{out_dir}/{modality}"
    _remove(f"{out_dir}/_staging")
    outputs["rejects"] = write_table(rejects_table(rejects, REJECT_SCHEMA), f"{out_dir}/rejects")
    wall = time.perf_counter() - t0
    listed = Counter(routed.column("modality").to_pylist())
    bad_rows = len(manifest.rejects) if manifest is not None else 0
    rejected_files = bad_rows + len({r["path"].split("#")[0] for r in rejects[bad_rows:]})
    total = manifest.rows if manifest is not None else files.num_rows  # listed files, or manifest rows
    metrics = {
        "files": total, "rejected_files": rejected_files,
        "files_per_s": round(total / wall, 3) if wall else None, "wall_s": round(wall, 2),
        "rows": {m: results[m]["rows"] for m in MODALITIES},
        "files_by_modality": {m: results[m]["files"] for m in MODALITIES},
        "files_in_by_modality": {m: listed.get(m, 0) for m in MODALITIES},
        "files_kept_by_modality": {m: results[m]["kept_files"] for m in MODALITIES},
        "rejects_by_reason": dict(Counter(f"{r['stage']}: {reason_class(r['reason'])}" for r in rejects)),
        "duplicates": {m: results[m]["duplicates"] for m in ("images", "text")},
        "throughput": {"route": {"files": files.num_rows, "wall_s": round(t_route, 3)},
                       **{m: results[m]["stages"] for m in MODALITIES if results[m]["stages"]}},
    }
    t_plots = time.perf_counter()
    outputs.update(write_plots(cfg, out_dir, outputs, metrics, results["images"]["dup_groups"]))
    metrics["plots_s"] = round(time.perf_counter() - t_plots, 2)
    return {"outputs": outputs, "metrics": metrics, "rejects": len(rejects)}


# ------------------------------------------------------------------ steps
def input_configured(cfg: MultimodalConfig) -> bool:
    """True when ``input.path`` (a folder, prefix or manifest) says what to process."""
    return bool(cfg.input.path)


def preflight(cfg: MultimodalConfig) -> None:
    """Before any cluster work: a local ``--input`` folder is refused (one line) when attached to
    a cluster whose nodes do not share this machine's disk: the decode tasks could not read it. A
    manifest is read by the driver alone, so a local one is fine (its columns are checked by the
    toolkit against :data:`~multimodal.sources.MANIFEST_SCHEMA`). ``input.endpoint`` becomes the
    driver's ``$OSS_ENDPOINT`` when that is unset, so those checks reach the same store."""
    import os

    if cfg.input.endpoint:
        os.environ.setdefault("OSS_ENDPOINT", cfg.input.endpoint)
    if cfg.input.path and not is_manifest(cfg.input.path, cfg.input.format):
        require_cluster_readable(cfg.input.path, "input", "--input")


def generate_sample(cfg: MultimodalConfig, run: Run) -> StepResult:
    """Step ``sample``: generate the mixed-media sample (with broken files) into ``<run_dir>/sample``
    (a local folder or object storage, like the run folder)."""
    import sys

    from .sample import generate

    folder = run.path("sample")
    made = generate(folder, cfg.sample)
    files = sum(len(v) for v in made["good"].values()) + len(made["broken"])
    print(f"generated a mixed-media sample ({files} files) in {folder}", file=sys.stderr)
    return StepResult({"sample": folder}, {"sample_files": files})


def process(cfg: MultimodalConfig, run: Run) -> StepResult:
    """Step ``process``: route, decode/embed per modality, dedup and write ``images``, ``video``,
    ``audio``, ``text``, ``rejects`` and the ``plot_*`` PNGs (:mod:`.report`) from ``input.path``
    (a folder, prefix or manifest, whose label/metadata columns are carried into every output) or
    the run folder's ``sample``. Too many rejected files (or manifest rows) fail the run (after the
    outputs are written)."""
    from ray.exceptions import RayError

    source = cfg.input.path or run.input("sample")
    try:
        result = etl(cfg, run.dir, source)
    except RayError as e:  # a stage failed on the cluster: its own error is the last line
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise RunFailed(f"pipeline failed: {lines[-1].strip() if lines else type(e).__name__}") from None
    m = result["metrics"]
    files, bad = m["files"], m["rejected_files"]
    ratio = cfg.input.max_reject_ratio
    failure = (f"{bad} of {files} files rejected, above input.max_reject_ratio {ratio} "
               f"(outputs and rejects in {run.dir})") if files and bad / files > ratio else None
    return StepResult(result["outputs"], m, rows=sum(m["rows"].values()), rejects=result["rejects"],
                      failure=failure)
