"""The embodied template's declaration (see :mod:`pipelines.template`)."""
from pipelines.template import Step, Template

from . import evaluate, rollout, train
from .config import TEMPLATE as NAME
from .config import EmbodiedConfig, load
from .policies import policy_spec


def collect_policy_exists(cfg: EmbodiedConfig) -> None:
    """Before any cluster work: the collect policy exists for this task."""
    policy_spec(cfg.collect.policy, cfg.env.id)


def expert_exists(cfg: EmbodiedConfig) -> None:
    """Before any cluster work: evaluation compares against the task's expert, so there must be one."""
    policy_spec("expert", cfg.env.id)


TEMPLATE = Template(
    name=NAME, load_config=load, key_metric="bc_success_rate",
    quality_bars={"gap_closed": ">= 0.8", "expert_success_rate": ">= 0.95",
                  "bc_success_rate": "> random_success_rate"},
    description="Robot rollouts: simulator actors + a batched policy collect a LeRobot v3 dataset "
                "-> behaviour cloning with Ray Train -> evaluation vs expert and random policies.",
    steps=[
        Step("collect", rollout.run, makes=("episodes", "rejects", "plot_trajectories"),
             preflight=collect_policy_exists,
             help="roll out the collect policy into a LeRobot v3 dataset (+ rejects, trajectory plot)"),
        Step("train", train.run, needs=("episodes",), makes=("policy", "plot_loss"),
             help="behaviour cloning on the episodes with Ray Train; final checkpoint as policy/, "
                  "learning curve"),
        Step("evaluate", evaluate.run, needs=("policy",), makes=("evaluation", "plot", "plot_success"),
             preflight=expert_exists,
             help="cloned policy vs expert and random on held-out seeds (evaluation.json, return and "
                  "success plots)"),
    ],
    test_overrides=["collect.episodes=24", "simulator.envs_per_actor=4", "train.epochs=2",
                    "train.checkpoint_every=1", "evaluate.episodes=8", "evaluate.min_gap_closed=0"],
)
