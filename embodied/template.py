"""The embodied template's declaration (see :mod:`pipelines.template`)."""
from pipelines.template import Step, Template

from . import evaluate, rollout, train, vision
from .config import TEMPLATE as NAME
from .config import EmbodiedConfig, load
from .inputs import FRAMES, describe
from .policies import policy_spec


def dataset_usable(cfg: EmbodiedConfig) -> None:
    """Before any cluster work: ``input.path``, when set, is a LeRobot v3 dataset this template can clone
    (one line naming what is missing and the file otherwise; see :mod:`embodied.inputs`)."""
    if cfg.input.path:
        describe(cfg)


def collect_policy_exists(cfg: EmbodiedConfig) -> None:
    """Before any cluster work: the collect policy exists for this task (and there is something to collect)."""
    if cfg.input.path:
        raise ValueError("input.path is set: there is nothing to collect (train and evaluate read that dataset); "
                         "unset input.path to collect rollouts")
    policy_spec(cfg.collect.policy, cfg.env.id)


def expert_exists(cfg: EmbodiedConfig) -> None:
    """Before any cluster work: evaluation compares against the task's expert, so there must be one
    (a policy cloned from the user's dataset is compared with an expert only where its env has one)."""
    if not cfg.input.path:
        policy_spec("expert", cfg.env.id)


def collecting(cfg: EmbodiedConfig) -> bool:
    """The all-in-one run collects rollouts unless the user gives a dataset (``input.path``)."""
    return not cfg.input.path


def train_needs(cfg: EmbodiedConfig) -> tuple[str, ...]:
    return () if cfg.input.path else ("episodes",)


TEMPLATE = Template(
    name=NAME, load_config=load, key_metric="bc_success_rate",
    quality_bars={"gap_closed": ">= 0.8", "expert_success_rate": ">= 0.95",
                  "bc_success_rate": "> random_success_rate"},
    description="Robot rollouts: simulator actors + a batched policy collect a LeRobot v3 dataset "
                "-> behaviour cloning with Ray Train -> evaluation vs expert and random policies. "
                "--input DATASET: behaviour cloning on your own LeRobot v3 dataset instead.",
    preflight=dataset_usable, inputs={"path": FRAMES},  # checked by dataset_usable (a folder, not a table)
    steps=[
        Step("collect", rollout.run, makes=("episodes", "rejects", "plot_trajectories"),
             preflight=collect_policy_exists, when=collecting,
             help="roll out the collect policy into a LeRobot v3 dataset (+ rejects, trajectory plot); "
                  "skipped with --input"),
        Step("train", train.run, needs=train_needs, makes=("policy", "plot_loss"),
             help="behaviour cloning on the episodes (or --input DATASET) with Ray Train; final checkpoint "
                  "as policy/, learning curve"),
        Step("train_vision", vision.run, needs=("episodes",), makes=("vision_policy", "plot_loss_vision"),
             preflight=vision.check_vision, when=vision.training_vision,
             help="a CNN policy on the episodes' camera frames (+ state) with Ray Train, read back through "
                  "Ray Data; runs when cameras.names is set (and vision.enabled); vision_policy/, learning curve"),
        Step("evaluate", evaluate.run, needs=("policy",), makes=("evaluation", "plot", "plot_success"),
             preflight=expert_exists,
             help="cloned policy (and the vision policy, when trained) vs expert and random on held-out seeds "
                  "(with --input: held-out action MSE, and the simulator only for a dataset of a known env; "
                  "evaluation.json, return and success plots)"),
    ],
    test_overrides=["collect.episodes=24", "simulator.envs_per_actor=4", "train.epochs=2",
                    "train.checkpoint_every=1", "evaluate.episodes=8", "evaluate.min_gap_closed=0"],
)
