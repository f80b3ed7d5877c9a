"""Config models for the embodied template (collect -> train -> evaluate)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import LocalRayConfig, StrictModel, load_config
from pipelines.input import InputConfig

TEMPLATE = "embodied"
PACKAGE_DIR = Path(__file__).resolve().parent
LOCAL_CONFIG = PACKAGE_DIR / "configs" / "local.yaml"


class EnvConfig(StrictModel):
    id: Literal["Reacher-v5", "Pusher-v5"] = "Reacher-v5"
    task: str = "move the fingertip to the red target"


class SimulatorConfig(StrictModel):
    """Simulator actors: ``max_actors`` of them, each stepping ``envs_per_actor`` envs."""

    num_cpus: float = Field(1.0, ge=0)
    max_actors: int = Field(2, ge=1, le=512)
    envs_per_actor: int = Field(16, ge=1, le=4096)
    steps_per_call: int = Field(50, ge=1, description="env steps per actor call (amortises Ray overhead)")
    queue_per_env: int = Field(2, ge=1, description="episodes queued per env slot on each actor")
    max_restarts: int = Field(3, ge=0, description="re-creations of a crashed actor before the run fails")


class PolicyServerConfig(StrictModel):
    """The batched policy actor (mode ``batched``)."""

    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_wait_ms: float = Field(2.0, ge=0)
    max_batch: int = Field(8192, ge=1)


class CollectConfig(StrictModel):
    policy: Literal["expert", "random"] = "expert"
    episodes: int = Field(200, ge=1)
    seed: int = Field(0, ge=0, description="episode k is reset with seed + k")
    mode: Literal["auto", "batched", "local"] = Field(
        "auto", description="auto: batched when policy_server.num_gpus > 0, else local (a CPU policy per simulator)")
    frames_per_file: int = Field(200_000, ge=1, description="data/ parquet files hold about this many frames")
    max_reject_ratio: float = Field(0.05, ge=0, le=1)
    action_noise: float = Field(0.0, ge=0, description="DART-style noisy demonstrations: Gaussian noise of sd "
                                "action_noise x half the action range added to the policy's action (clipped "
                                "to the bounds, seeded per episode); the dataset records the executed action")


class TrainConfig(StrictModel):
    num_workers: int = Field(2, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(20, ge=1, description="epochs between checkpoints")
    seed: int = 0


class EvaluateConfig(StrictModel):
    episodes: int = Field(50, ge=1)
    seed: int = Field(1_000_000, ge=0, description="held-out seeds: seed + k, disjoint from collect seeds")
    mode: Literal["auto", "batched", "local"] = Field(
        "auto", description="auto: batched when policy_server.num_gpus > 0, else local (a CPU policy per simulator)")
    min_gap_closed: float = Field(0.0, ge=0, le=1,
                                  description="fail the run when BC closes less of the random->expert gap")


class VisionConfig(StrictModel):
    """The vision policy (step ``train_vision``): a small CNN on one camera's frames (+ the state vector),
    trained with Ray Train on the collected video dataset read back through Ray Data."""

    enabled: bool = Field(True, description="train_vision runs in the all-in-one run when cameras.names is "
                                            "non-empty and this is true")
    camera: str | None = Field(None, description="the camera the policy sees; unset: the first of cameras.names")
    use_state: bool = Field(True, description="also feed the state vector; false: the frames alone")
    channels: list[int] = Field(default_factory=lambda: [8, 16, 32, 32], min_length=1,
                                description="conv layers, stride 2 but the last (96x96 -> 12x12 with four), "
                                            "then a spatial softmax: an (x, y) per channel of the last")
    hidden: int = Field(256, ge=1)
    num_workers: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    shuffle_rows: int = Field(2000, ge=1, description="each worker's local shuffle buffer (frames)")
    checkpoint_every: int = Field(10, ge=1, description="epochs between checkpoints")
    seed: int = 0


class CamerasConfig(StrictModel):
    """Cameras rendered in the simulator actors (MuJoCo offscreen, CPU) and stored as LeRobot v3 video.

    ``names`` empty: no cameras (state vectors only). A name is a view of ``embodied.cameras.VIEWS``
    (Reacher-v5: top, side; Pusher-v5: top, front) or a camera of the env's MuJoCo model."""

    names: list[str] = Field(default_factory=list, description="cameras to render and record; empty: none")
    width: int = Field(96, ge=8, le=1024)
    height: int = Field(96, ge=8, le=1024)
    shadows: bool = Field(False, description="MuJoCo shadow maps (slow on a CPU renderer: ~10x on Pusher)")
    gl: Literal["egl", "osmesa"] = Field("egl", description="MUJOCO_GL of the simulator actors (the "
                                                            "environment's MUJOCO_GL wins when set)")
    crf: int = Field(23, ge=0, le=51, description="H.264 quality (lower: better, bigger)")
    gop: int = Field(2, ge=1, description="frames between keyframes (LeRobot's random access uses 2)")
    encode_mb: float = Field(64.0, gt=0, description="raw frames (MB) per encoding task and MP4 file")
    encode_num_cpus: float = Field(1.0, ge=0, description="CPUs of each encoding task")
    max_encoding: int = Field(2, ge=1, description="encoding tasks in flight before the collect waits")


class EmbodiedInputConfig(InputConfig):
    """``input.path``: a LeRobot v3 dataset (folder or ``oss://`` prefix) to clone instead of collecting;
    ``input.columns`` maps ``state``/``action`` onto its features (see :mod:`embodied.inputs`)."""

    path: str | None = Field(None, description="a LeRobot v3 dataset folder or oss:// prefix; unset: collect "
                                               "our own rollouts")
    env: str | None = Field(None, description="simulator env the dataset was recorded in (Reacher-v5, Pusher-v5) "
                                              "or none; unset: meta/info.json's robot_type when it is one")
    holdout: float = Field(0.1, gt=0, lt=1, description="share of the episodes held out of training for the "
                                                        "offline evaluation (at least one)")
    max_reject_ratio: float = Field(0.05, ge=0, le=1, description="fail the run (after writing) above this "
                                                                   "share of rejected episodes")

    @field_validator("columns")
    @classmethod
    def _short_names(cls, columns: dict[str, str]) -> dict[str, str]:
        """``state`` is short for ``observation.state`` (``--set`` splits keys at dots)."""
        return {("observation.state" if k == "state" else k): v for k, v in columns.items()}

    def is_table(self, path: str) -> bool:
        return False  # a LeRobot dataset is a folder of tables and JSON: embodied.inputs.describe checks it

    def workers_read(self, path: str) -> bool:
        return False  # the driver reads the frames and hands them to the Train workers


class EmbodiedConfig(StrictModel):
    local_ray: LocalRayConfig = LocalRayConfig()
    input: EmbodiedInputConfig = EmbodiedInputConfig()
    env: EnvConfig = EnvConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    policy_server: PolicyServerConfig = PolicyServerConfig()
    collect: CollectConfig = CollectConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    cameras: CamerasConfig = CamerasConfig()
    vision: VisionConfig = VisionConfig()

    @model_validator(mode="after")
    def _cameras_exist(self):
        """Every camera name is a camera of the env (see :func:`embodied.cameras.check_cameras`)."""
        if self.cameras.names:
            from .cameras import check_cameras

            check_cameras(self.env.id, self.cameras.names)
        return self


def load(path: str | None = None, overrides=()) -> EmbodiedConfig:
    """The template config: ``path`` (default ``configs/local.yaml``) plus ``--set`` overrides."""
    return load_config(EmbodiedConfig, path, overrides, default_path=LOCAL_CONFIG)
