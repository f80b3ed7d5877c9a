"""Your own data: behaviour cloning on any LeRobot v3 dataset (``input.path``), not only our rollouts.

A LeRobot v3 dataset is a folder (local or ``oss://``/``s3://``) with ``meta/info.json`` (the
features: names, dtypes, shapes), the frames in ``data/**/*.parquet`` and per-episode metadata in
``meta/episodes/``. It is not one table, so the template does not declare a table schema for the
toolkit's column check: :func:`describe` checks ``meta/info.json`` and the first data file's footer
itself (the template's preflight, one line naming what is missing and the file, before any cluster
work). :data:`FRAMES` documents the frame columns read (``docs/embodied.md``).

What is read: the state feature (``observation.state``, or ``input.columns.state``), the action
feature (``action``, or ``input.columns.action``), ``episode_index`` and, when present, ``index``;
their sizes come from ``meta/info.json``, not from our simulator. Episodes with a frame whose
state or action is missing, of the wrong length or not finite go to ``rejects`` (the run fails,
after writing, above ``input.max_reject_ratio`` of the episodes). ``input.holdout`` of the
episodes (at least one) are held out of training for the offline evaluation: held-out action
MSE of the cloned policy against predicting the training frames' mean action.

The simulator evaluation runs only when the dataset names one of our envs with the same state
and action sizes: ``input.env`` (an env id; ``none`` = offline only), else ``robot_type`` in
``meta/info.json`` when it is an env id of this template (``Reacher-v5``, ``Pusher-v5``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import redact
from pipelines.input import InputError, column
from pipelines.io import (
    exists,
    filesystem_for,
    first_line,
    is_remote,
    join,
    list_files,
    read_json,
    read_table,
    reject,
)

from .envs import SUCCESS_DISTANCE, env_facts

NUMERIC = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")

FRAMES = pa.schema([
    column("observation.state", pa.list_(pa.float32()),
           "the robot's state at the frame, a fixed-length numeric vector (shape `[n]` in meta/info.json; "
           "any unit): the policy's input. Another feature: `input.columns.state=NAME`"),
    column("action", pa.list_(pa.float32()),
           "the action commanded at the frame, a fixed-length numeric vector (shape `[m]`): what behaviour "
           "cloning regresses. Another feature: `input.columns.action=NAME`"),
    column("episode_index", pa.int64(),
           "the frame's episode: the train / held-out split is by episode, rejects name episodes"),
    column("index", pa.int64(), "global frame index: frames are used in this order", required=False),
])

INFO_FIELDS = [  # meta/info.json: (field, required, what it is used for)
    ("codebase_version", "yes", "`v3.x` (convert a v2.1 dataset with lerobot's `convert_dataset_v21_to_v30`)"),
    ("features.<state>", "yes", "`dtype` numeric, `shape` `[n]`: the policy's input size (`names` are recorded in `policy/dataset.json`)"),
    ("features.<action>", "yes", "`dtype` numeric, `shape` `[m]`: the policy's output size"),
    ("total_episodes", "yes", "at least 2 (one or more are held out)"),
    ("robot_type", "no", ("an env id of this template (`Reacher-v5`, `Pusher-v5`) with the same sizes: also "
                         "evaluate in the simulator (or set `input.env`)")),
]


@dataclass
class DatasetSpec:
    """What a run uses of a user's dataset (checked by :func:`describe`; recorded as ``policy/dataset.json``)."""

    dataset: str
    state: str
    action: str
    obs_dim: int
    act_dim: int
    total_episodes: int
    episode: str = "episode_index"
    index: str | None = "index"  # None: the dataset has no global frame index (file order is used)
    state_names: list | None = None
    action_names: list | None = None
    robot_type: str | None = None
    env: str | None = None  # the simulator env to evaluate in, or None: offline metrics only
    env_reason: str = ""
    source: str = "input"
    heldout_episodes: list[int] = field(default_factory=list)
    rejected_episodes: list[int] = field(default_factory=list)
    mean_action: list[float] = field(default_factory=list)

    def as_json(self) -> dict:
        return {**asdict(self), "dataset": redact(self.dataset)}


def info_uri(path: str) -> str:
    return join(path, "meta", "info.json")


def read_dataset_info(path: str) -> dict:
    """``meta/info.json`` of ``path``; InputError (one line) when the folder is not a LeRobot dataset."""
    uri = info_uri(path)
    if not exists(path):
        raise InputError(f"input.path {redact(path)}: not found")
    if not exists(uri):
        raise InputError(f"input.path {redact(path)} is not a LeRobot v3 dataset: no meta/info.json "
                         f"({redact(uri)} missing)")
    try:
        info = read_json(uri)
    except (ValueError, OSError) as e:
        raise InputError(f"{redact(uri)}: cannot read it as JSON: {first_line(e)}") from None
    if not isinstance(info, dict):
        raise InputError(f"{redact(uri)}: not a JSON object")
    return info


def _vector_feature(info: dict, role: str, name: str, uri: str) -> tuple[int, list | None]:
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise InputError(f"{uri}: no features")
    feat = features.get(name)
    if not isinstance(feat, dict):
        raise InputError(f"{uri}: no feature {name!r} for the {role} (features: {', '.join(features)}); "
                         f"map yours with --set input.columns.{role}=FEATURE")
    dtype, shape = feat.get("dtype"), feat.get("shape")
    if dtype not in NUMERIC:
        raise InputError(f"{uri}: feature {name!r} has dtype {dtype!r}: the {role} must be a numeric vector")
    if not (isinstance(shape, list | tuple) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1):
        raise InputError(f"{uri}: feature {name!r} has shape {shape!r}: the {role} must be a vector (shape [n])")
    names = feat.get("names")
    return int(shape[0]), names if isinstance(names, list) else None


def known_env(info: dict, obs_dim: int, act_dim: int, wanted: str | None) -> tuple[str | None, str]:
    """``(env id to evaluate in, or None; why)``: ``input.env`` when set (``none``: offline only; an env
    id must exist and match the sizes, else InputError), else ``robot_type`` when it is one of our envs
    with the same state and action sizes."""
    envs = ", ".join(SUCCESS_DISTANCE)
    if wanted is not None and wanted.lower() == "none":
        return None, "input.env is none"
    candidate, origin = (wanted, "input.env") if wanted else (info.get("robot_type"), "robot_type")
    if candidate not in SUCCESS_DISTANCE:
        if wanted:
            raise InputError(f"input.env {wanted!r} is not a simulator env of this template ({envs}; none: "
                             "offline evaluation only)")
        return None, f"robot_type {candidate!r} is not a simulator env of this template ({envs})"
    facts = env_facts(candidate)
    if (obs_dim, act_dim) != (facts["obs_dim"], facts["act_dim"]):
        why = (f"{origin} {candidate} has state/action sizes {facts['obs_dim']}/{facts['act_dim']}, "
               f"the dataset {obs_dim}/{act_dim}")
        if wanted:
            raise InputError(why)
        return None, why
    return candidate, f"{origin} {candidate}"


def describe(cfg) -> DatasetSpec:
    """Check the configured dataset without reading its frames: InputError (one line, naming what is
    missing and the file) when it cannot be used. No Ray."""
    inp = cfg.input
    path = inp.path.rstrip("/")
    if inp.format not in (None, "parquet") or inp.table:
        raise InputError("embodied reads a LeRobot v3 dataset folder: leave input.format and input.table unset")
    unknown = sorted(set(inp.columns) - set(FRAMES.names))
    if unknown:
        raise InputError(f"input.columns maps {unknown[0]!r}, which is not a column of this template's input "
                         f"(columns: {', '.join(FRAMES.names)}; state is short for observation.state)")
    info = read_dataset_info(path)
    uri = redact(info_uri(path))
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise InputError(f"{uri}: codebase_version {version or 'missing'}, need v3.x (convert a v2.1 dataset "
                         "with lerobot's convert_dataset_v21_to_v30)")
    state, action, episode, index = (inp.columns.get(name, name) for name in FRAMES.names)
    obs_dim, state_names = _vector_feature(info, "state", state, uri)
    act_dim, action_names = _vector_feature(info, "action", action, uri)
    total = info.get("total_episodes")
    if not isinstance(total, int) or total < 2:
        raise InputError(f"{uri}: total_episodes {total!r}: need at least 2 (episodes are held out for the "
                         "offline evaluation)")
    files = [f for f in list_files(join(path, "data")) if f.endswith(".parquet")]
    if not files:
        raise InputError(f"input.path {redact(path)}: no frames (no data/**/*.parquet)")
    fs, where = filesystem_for(files[0])
    try:
        with fs.open_input_file(where) as f:
            names = pq.read_schema(f).names
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{redact(files[0])}: cannot read it as Parquet: {first_line(e)}") from None
    for name in (state, action, episode):
        if name not in names:
            raise InputError(f"{redact(files[0])}: no column {name!r} (columns there: {', '.join(names[:20])})")
    env, why = known_env(info, obs_dim, act_dim, inp.env)
    where = path if is_remote(path) else str(Path(path).resolve())  # recorded: must work from any folder
    return DatasetSpec(dataset=where, state=state, action=action, obs_dim=obs_dim, act_dim=act_dim,
                       total_episodes=total, episode=episode, index=index if index in names else None,
                       state_names=state_names, action_names=action_names, robot_type=info.get("robot_type"),
                       env=env, env_reason=why)


@dataclass
class Frames:
    obs: np.ndarray  # (n, obs_dim) float32
    act: np.ndarray  # (n, act_dim) float32
    episode: np.ndarray  # (n,) int64
    good: np.ndarray  # (n,) bool: frame of an episode that is not rejected
    rejects: list[dict]  # one record per rejected episode


def _fixed_vectors(col: pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values (n, dim) float32, NaN where unusable; length ok; finite)`` of a list column."""
    col = col.combine_chunks()
    n = len(col)
    values = np.full((n, dim), np.nan, dtype=np.float32)
    ok = np.asarray(pc.fill_null(pc.equal(pc.list_value_length(col), dim), False).to_numpy(zero_copy_only=False))
    rows = np.flatnonzero(ok)
    if len(rows):
        flat = pc.list_flatten(col.filter(pa.array(ok))).cast(pa.float32())
        values[rows] = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(rows), dim)
    finite = np.isfinite(values).all(axis=1)
    return values, ok, finite


def load_frames(spec: DatasetSpec) -> Frames:
    """Every frame's state and action (frame order), with episodes that cannot be used as rejects."""
    columns = [spec.state, spec.action, spec.episode, *([spec.index] if spec.index else [])]
    table = read_table(join(spec.dataset, "data"), columns=list(dict.fromkeys(columns)))
    if spec.index:
        table = table.sort_by([(spec.index, "ascending")])
    episode = np.asarray(pc.fill_null(table[spec.episode].cast(pa.int64()), -1).to_numpy(), dtype=np.int64)
    reasons = np.full(len(episode), None, dtype=object)
    parts = {}
    for name, dim in ((spec.state, spec.obs_dim), (spec.action, spec.act_dim)):
        if not (pa.types.is_list(table[name].type) or pa.types.is_fixed_size_list(table[name].type)
                or pa.types.is_large_list(table[name].type)):
            raise InputError(f"{redact(spec.dataset)}/data: column {name!r} is {table[name].type}, not a vector")
        values, ok, finite = _fixed_vectors(table[name], dim)
        unset = np.array([r is None for r in reasons])
        reasons[unset & ~ok] = f"{name}: missing or not of length {dim}"
        reasons[unset & ok & ~finite] = f"{name}: a value is not finite"
        parts[name] = values
    reasons[(episode < 0) & np.array([r is None for r in reasons])] = f"{spec.episode} is empty"
    bad = np.array([r is not None for r in reasons])
    rejected = np.unique(episode[bad])
    rejects = []
    for k in rejected:
        first = np.flatnonzero(bad & (episode == k))[0]
        frame = first - np.flatnonzero(episode == k)[0]
        rejects.append(reject(f"episode-{k}", "input", f"frame {frame}: {reasons[first]}", episode_index=int(k)))
    good = ~np.isin(episode, rejected)
    return Frames(parts[spec.state], parts[spec.action], episode, good, rejects)


def split_episodes(episodes: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(training episode ids, held-out episode ids)``: ``holdout`` of the episodes (at least one, at
    most all but one), chosen with ``seed``."""
    ids = np.unique(episodes)
    if len(ids) < 2:
        raise InputError(f"{len(ids)} usable episode(s): need at least 2 (one is held out)")
    n = min(len(ids) - 1, max(1, round(holdout * len(ids))))
    held = np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))
    return np.setdiff1d(ids, held), held


def offline_metrics(weights: dict, obs: np.ndarray, act: np.ndarray, mean_action) -> dict:
    """Held-out action MSE of the cloned policy (as it acts: clipped to its bounds) against the baseline
    that always predicts the training frames' mean action; ``heldout_action_r2`` = 1 - their ratio."""
    from .policies import TorchPolicy

    policy = TorchPolicy(weights, device="cpu")
    pred = np.concatenate([policy(obs[i:i + 65536]) for i in range(0, len(obs), 65536)]) if len(obs) else obs
    bc = float(np.mean((pred - act) ** 2))
    base = float(np.mean((np.asarray(mean_action, dtype=np.float32)[None] - act) ** 2))
    return {"heldout_action_mse": bc, "baseline_action_mse": base,
            "heldout_action_r2": 1.0 - bc / base if base > 0 else float("nan"), "heldout_frames": len(obs)}
