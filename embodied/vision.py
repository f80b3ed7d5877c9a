"""A vision policy: behaviour cloning from camera frames (+ the state vector) with a small CNN.

The ``train_vision`` step (``python -m embodied train_vision --run-dir DIR``; in the all-in-one run
when ``cameras.names`` is non-empty and ``vision.enabled``) reads the run's LeRobot v3 dataset
(output ``episodes``, recorded with cameras) back through Ray Data: one row per episode
(``meta/episodes``) -> :func:`episode_frames` (``map_batches``: decodes the episode's video of
``vision.camera`` with :func:`embodied.video.decode_episode_frames` and reads its state and action
frames) -> rows ``{image: uint8 (H, W, 3), state, action}``. ``TorchTrainer`` streams that dataset
to ``vision.num_workers`` DDP workers (each epoch decodes again: frames never sit on the driver),
CUDA when ``vision.num_gpus`` gives them a GPU. The final checkpoint is output ``vision_policy``,
the learning curve ``vision_learning_curve.png`` (output ``plot_loss_vision``); ``evaluate`` rolls
the policy out with the cameras on (the simulator passes ``images={camera: uint8 (N, H, W, 3)}``).

The network (:func:`build_cnn`): convolutions on the 96x96 frame (``vision.channels``, stride 2 but the
last: 12x12 maps), a spatial softmax (the expected (x, y) of each map: where the arm and the target are
is what matters), concatenated with the normalised state (``vision.use_state``), a 2-layer MLP head. Actions are regressed in units of the env's bounds (``[-1, 1]``) and mapped back
and clipped when the policy acts.
"""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipelines.io import filesystem_for, join, read_json, write_json
from pipelines.report import plot_lines
from pipelines.template import Run, StepResult

from .dataset import DATA_PATH, read_episodes, read_info, vectors
from .envs import env_facts
from .train import TRAINED_ON, keep_checkpoint, report_epoch, train_with_ray


def build_cnn(height: int, width: int, state_dim: int, act_dim: int, channels=(8, 16, 32, 32),
              hidden: int = 256, state_mean=None, state_std=None):
    """The vision policy network: ``forward(image uint8 (N, H, W, 3), state (N, state_dim))`` ->
    actions in units of the env's bounds. ``state_dim`` 0: the frame alone."""
    import torch
    from torch import nn

    class VisionNet(nn.Module):
        def __init__(self):
            super().__init__()
            mean = torch.zeros(state_dim) if state_mean is None else torch.as_tensor(state_mean, dtype=torch.float32)
            std = torch.ones(state_dim) if state_std is None else torch.as_tensor(state_std, dtype=torch.float32)
            self.register_buffer("state_mean", mean)
            self.register_buffer("state_std", torch.clamp(std, min=1e-6))
            layers, width_in = [], 3
            for i, ch in enumerate(channels):
                kernel, stride = (5, 2) if i == 0 else (3, 1 if i == len(channels) - 1 else 2)
                layers += [nn.Conv2d(width_in, ch, kernel, stride=stride, padding=kernel // 2), nn.ReLU()]
                width_in = ch
            self.encoder = nn.Sequential(*layers)
            with torch.no_grad():
                _, _, h, w = self.encoder(torch.zeros(1, 3, height, width)).shape
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1))  # (h*w, 2)
            self.head = nn.Sequential(nn.Linear(2 * width_in + state_dim, hidden), nn.ReLU(),
                                      nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, act_dim))

        def forward(self, image, state):
            x = image.permute(0, 3, 1, 2).float() / 255.0 - 0.5
            maps = self.encoder(x).flatten(2)  # (N, C, h*w)
            z = (torch.softmax(maps, dim=-1) @ self.grid).flatten(1)  # spatial softmax: (x, y) per channel
            if state_dim:
                z = torch.cat([z, (state.float() - self.state_mean) / self.state_std], dim=1)
            return self.head(z)

    return VisionNet()


def to_units(action, low, high):
    """Actions in units of the bounds: ``low`` -> -1, ``high`` -> +1."""
    low, high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
    return (np.asarray(action, dtype=np.float32) - (high + low) / 2) / ((high - low) / 2)


def from_units(units, low, high):
    """Inverse of :func:`to_units`, clipped to the bounds."""
    low, high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
    return np.clip((high + low) / 2 + np.asarray(units, dtype=np.float32) * (high - low) / 2, low, high)


def vision_weights(model, arch: dict) -> dict:
    """A portable snapshot of a vision policy: CPU tensors + ``arch`` (what :class:`VisionPolicy` rebuilds)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"kind": "vision", "state_dict": state, **arch}


def arch_of(weights: dict) -> dict:
    return {k: weights[k] for k in ("camera", "height", "width", "state_dim", "act_dim", "channels", "hidden")}


class VisionPolicy:
    """A trained vision policy as a simulator policy: ``(obs, images={camera: (N, H, W, 3)}) -> actions``;
    CUDA when available, else CPU (same code path)."""

    def __init__(self, weights: dict, device: str | None = None):
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.camera = weights["camera"]
        self.shape = (weights["height"], weights["width"], 3)
        self.model = build_cnn(weights["height"], weights["width"], weights["state_dim"], weights["act_dim"],
                               weights["channels"], weights["hidden"])
        self.model.load_state_dict(weights["state_dict"])
        self.model.to(self.device).eval()
        self.low, self.high = weights["low"], weights["high"]

    def __call__(self, obs: np.ndarray, images: dict | None = None) -> np.ndarray:
        if not images or self.camera not in images:
            raise ValueError(f"the vision policy needs frames of camera {self.camera!r} "
                             f"(got: {', '.join(images or {}) or 'none'}): turn it on with cameras.names")
        frames = np.asarray(images[self.camera])
        if frames.shape[1:] != self.shape:
            raise ValueError(f"the vision policy was trained on {self.shape} frames of camera {self.camera!r}, "
                             f"got {frames.shape[1:]}: set cameras.width/height as in training")
        torch = self.torch
        with torch.inference_mode():
            image = torch.as_tensor(frames, device=self.device)
            state = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)
            units = self.model(image, state).float().cpu().numpy()
        return from_units(units, self.low, self.high)


# --------------------------------------------------------------- Ray Data reader
def episode_frames(batch: dict, root: str, camera: str) -> dict:
    """``map_batches`` stage (Ray tasks): rows of a dataset's episode metadata -> the frames of those episodes,
    ``{index, image: uint8 (T, H, W, 3), state: float32 (T, n), action: float32 (T, m)}`` (one row per
    frame; ``index`` is the frame's global index in the dataset).

    The state and action come from the episode's data file, the image from its video of ``camera``
    (:func:`embodied.video.decode_episode_frames`); a video whose frame count differs from the episode's
    frames is a one-line error naming both.
    """
    from .video import decode_episode_frames

    indexes, images, states, actions = [], [], [], []
    for i in range(len(batch["episode_index"])):
        row = {key: (value[i].item() if hasattr(value[i], "item") else value[i]) for key, value in batch.items()}
        episode = int(row["episode_index"])
        fs, path = filesystem_for(join(root, DATA_PATH.format(chunk_index=int(row["data/chunk_index"]),
                                                              file_index=int(row["data/file_index"]))))
        frames = pq.read_table(path, filesystem=fs, columns=["index", "observation.state", "action"],
                               filters=[("episode_index", "==", episode)]).sort_by("index")
        video = decode_episode_frames(root, row, camera)
        if len(video) != frames.num_rows:
            raise ValueError(f"episode {episode}: video observation.images.{camera} has {len(video)} frames, "
                             f"its data {frames.num_rows}")
        indexes.append(frames["index"].to_numpy())
        images.append(np.asarray(video, dtype=np.uint8))
        states.append(vectors(frames["observation.state"]))
        actions.append(vectors(frames["action"]))
    return {"index": np.concatenate(indexes), "image": np.concatenate(images), "state": np.concatenate(states),
            "action": np.concatenate(actions)}


def recorded_cameras(info: dict) -> list[str]:
    """The cameras a dataset holds video of (its ``observation.images.<camera>`` video features)."""
    return [k.split(".", 2)[2] for k, f in info.get("features", {}).items()
            if k.startswith("observation.images.") and f.get("dtype") == "video"]


def episode_rows(root: str, camera: str) -> list[dict]:
    """The episode metadata rows a reader needs (index, data file, length, the camera's video columns)."""
    table = read_episodes(root)
    prefix = f"videos/observation.images.{camera}/"
    keep = [c for c in table.column_names
            if c in ("episode_index", "length", "data/chunk_index", "data/file_index") or c.startswith(prefix)]
    return table.select(keep).to_pylist()


def read_vision_dataset(root: str, camera: str, episodes_per_task: int = 1):
    """The frames of a LeRobot v3 dataset with ``camera`` recorded, as a lazy Ray Dataset of rows
    ``{index, image, state, action}`` (episodes decoded in Ray tasks, never on the driver; rows in no
    particular order unless Ray Data's ``preserve_order`` is set)."""
    import ray

    videos = recorded_cameras(read_info(root))
    if camera not in videos:
        raise ValueError(f"dataset {root} has no video of camera {camera!r} "
                         f"(cameras: {', '.join(videos) or 'none'}): collect with cameras.names=[{camera}]")
    rows = episode_rows(root, camera)
    if not rows:
        raise ValueError(f"dataset {root} has no episodes")
    return ray.data.from_items(rows).map_batches(episode_frames, fn_kwargs={"root": root, "camera": camera},
                                                 batch_size=episodes_per_task, batch_format="numpy")


# ------------------------------------------------------------------ training
def train_epoch(model, optimizer, batches, low, high):
    """One pass of ``model`` over ``batches`` (dicts of tensors ``image``, ``state``, ``action``): MSE on the
    actions in units of the bounds ``low``..``high``. Returns ``tensor([summed loss, rows])`` (on the
    model's device, for an all-reduce across workers)."""
    import torch

    device = next(model.parameters()).device
    mid = torch.tensor((np.add(high, low) / 2), dtype=torch.float32, device=device)
    half = torch.tensor((np.subtract(high, low) / 2), dtype=torch.float32, device=device)
    total = torch.zeros(2, device=device)
    model.train()
    for b in batches:
        target = (b["action"].to(device).float() - mid) / half
        loss = torch.nn.functional.mse_loss(model(b["image"].to(device), b["state"].to(device)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += torch.stack([loss.detach() * len(target), torch.tensor(float(len(target)), device=device)])
    return total


def train_loop(config: dict) -> None:
    """One Ray Train worker: DDP regression of the actions (in bound units) on frames + state, streamed from
    the worker's shard of the ``train`` dataset; rank 0 checkpoints."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    arch = config["arch"]
    device = ray.train.torch.get_device()
    model = build_cnn(arch["height"], arch["width"], arch["state_dim"], arch["act_dim"], arch["channels"],
                      arch["hidden"], config["state_mean"], config["state_std"])
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    shard = ray.train.get_dataset_shard("train")
    batch = max(1, config["batch_size"] // world)
    history = []
    for epoch in range(1, config["epochs"] + 1):
        batches = shard.iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=config["shuffle_rows"],
                                           local_shuffle_seed=config["seed"] + 1000 * epoch + rank,
                                           device=device, dtypes=None)
        total = train_epoch(model, optimizer, batches, config["low"], config["high"])
        scheduler.step()
        if world > 1:
            torch.distributed.all_reduce(total)
        history.append(float(total[0]) / max(float(total[1]), 1.0))
        if epoch % config["checkpoint_every"] and epoch != config["epochs"]:
            continue
        metrics = {"epoch": epoch, "loss": history[-1], "loss_history": list(history), "frames": int(total[1])}
        net = model.module if hasattr(model, "module") else model
        report_epoch(metrics, vision_weights(net, {**arch, "low": config["low"], "high": config["high"]})
                     if rank == 0 else None)


def fit_vision(vcfg, dataset, arch: dict, state_mean, state_std, low, high, run_dir: str) -> dict:
    """Train the vision policy on ``dataset`` (a Ray Dataset of ``{image, state, action}``) with
    ``TorchTrainer`` sized by ``vcfg`` (the ``vision`` config section); metrics, the final checkpoint and
    the loss history."""
    loop_config = {"arch": arch, "lr": vcfg.lr, "weight_decay": vcfg.weight_decay, "epochs": vcfg.epochs,
                   "batch_size": vcfg.batch_size, "checkpoint_every": vcfg.checkpoint_every, "seed": vcfg.seed,
                   "shuffle_rows": vcfg.shuffle_rows,
                   "state_mean": None if state_mean is None else list(map(float, state_mean)),
                   "state_std": None if state_std is None else list(map(float, state_std)),
                   "low": list(map(float, low)), "high": list(map(float, high))}
    result = train_with_ray(train_loop, loop_config, vcfg, run_dir, "vision", datasets={"train": dataset})
    metrics = {"vision_train_loss": float(result.metrics["loss"]), "vision_train_epochs": int(result.metrics["epoch"]),
               "vision_train_frames": int(result.metrics["frames"]), "vision_train_workers": vcfg.num_workers}
    return {"metrics": metrics, "checkpoint": result.checkpoint, "loss_history": result.metrics["loss_history"]}


def plot_vision_curve(uri: str, loss_history: list[float], baseline: float, title: str) -> str:
    """The vision policy's training loss per epoch, with the mean-action baseline (PNG at ``uri``)."""
    epochs = list(range(1, len(loss_history) + 1))
    return plot_lines(uri, {"train loss": (epochs, loss_history),
                            "mean action": ([1, max(len(epochs), 1)], [baseline, baseline])},
                      xlabel="epoch", ylabel="MSE on actions (bound units)", title=title)


# ---------------------------------------------------------------------- step
def vision_camera(cfg, info: dict | None = None) -> str:
    """The camera the vision policy sees: ``vision.camera``, else the first of ``cameras.names``, else (given
    the dataset's ``info``) its first recorded camera."""
    names = list(cfg.cameras.names)
    recorded = recorded_cameras(info or {})
    camera = cfg.vision.camera or (names[0] if names else None) or (recorded[0] if recorded else None)
    if not camera:
        raise ValueError("the vision policy needs camera frames: collect with cameras.names (e.g. --set "
                         "'cameras.names=[top]')")
    return camera


def check_vision(cfg) -> None:
    """Before any cluster work: a ``vision.camera`` is one of the recorded ``cameras.names``."""
    if cfg.input.path:
        raise ValueError("train_vision clones a dataset this template collected with cameras on; input.path is "
                         "set (unset it and collect with cameras.names)")
    if cfg.vision.camera and cfg.cameras.names and cfg.vision.camera not in cfg.cameras.names:
        raise ValueError(f"vision.camera {cfg.vision.camera!r} is not recorded: add it to cameras.names "
                         f"({', '.join(cfg.cameras.names)})")


def training_vision(cfg) -> bool:
    """The all-in-one run trains the vision policy when we collect with cameras on and ``vision.enabled``."""
    return bool(cfg.cameras.names) and cfg.vision.enabled and not cfg.input.path


def run(cfg, run: Run) -> StepResult:
    """The train_vision step: the CNN policy on the run's ``episodes`` (frames of ``vision.camera``); its final
    checkpoint is output ``vision_policy`` (what ``evaluate`` rolls out with the cameras on), the learning
    curve ``plot_loss_vision``."""
    check_vision(cfg)
    dataset = run.input("episodes")
    info = read_info(dataset)
    camera = vision_camera(cfg, info)
    env_id = info["robot_type"]
    facts = env_facts(env_id)
    if camera not in recorded_cameras(info):
        raise ValueError(f"dataset {dataset} has no video of camera {camera!r} (cameras: "
                         f"{', '.join(recorded_cameras(info)) or 'none'}): collect with cameras.names=[{camera}]")
    feature = info["features"][f"observation.images.{camera}"]
    height, width = int(feature["shape"][0]), int(feature["shape"][1])
    stats = read_json(join(dataset, "meta", "stats.json"))
    state_dim = facts["obs_dim"] if cfg.vision.use_state else 0
    mean = stats["observation.state"]["mean"] if state_dim else None
    std = stats["observation.state"]["std"] if state_dim else None
    half = (np.asarray(facts["high"]) - np.asarray(facts["low"])) / 2
    baseline = float(np.mean((np.asarray(stats["action"]["std"]) / half) ** 2))  # MSE of the mean action
    arch = {"camera": camera, "height": height, "width": width, "state_dim": state_dim,
            "act_dim": facts["act_dim"], "channels": list(cfg.vision.channels), "hidden": cfg.vision.hidden}
    result = fit_vision(cfg.vision, read_vision_dataset(dataset, camera), arch, mean, std,
                        facts["low"], facts["high"], run.dir)
    policy = keep_checkpoint(result["checkpoint"], run.path("vision_policy"))
    write_json(join(policy, TRAINED_ON), {"source": "collect", "dataset": dataset, "env": env_id, "camera": camera})
    curve = plot_vision_curve(run.path("vision_learning_curve.png"), result["loss_history"], baseline,
                              f"{env_id}: vision policy (camera {camera})")
    metrics = {**result["metrics"], "vision_baseline_loss": baseline}
    return StepResult({"vision_policy": policy, "plot_loss_vision": curve}, metrics)
