"""The riskcontrol template's declaration (see :mod:`pipelines.template`)."""
from pipelines.template import Run, Step, StepResult, Template, require_cluster_readable

from . import data, evaluate, features, score, train
from .config import load
from .inputs import LABELS, TRANSACTIONS


def online(cfg, run: Run) -> StepResult:
    """The online step: deploy the run's model on Serve, replay ``serve.smoke_requests`` transactions."""
    from .serve import smoke_test

    stats = smoke_test(cfg, run.input("model"), run.input("transactions"))
    return StepResult(metrics={f"online_{k}": v for k, v in stats.items()})


def preflight(cfg) -> None:
    """Before any cluster work: a configured scoring model the cluster can read loads (the toolkit checks
    ``input.*`` against ``inputs``)."""
    require_cluster_readable(cfg.score.model_dir, "score.model_dir", "--model")
    if cfg.score.model_dir:
        train.load_model(cfg.score.model_dir)


TEMPLATE = Template(
    name="riskcontrol", load_config=load, key_metric="auprc",
    quality_bars={"auprc": ">= 0.6", "roc_auc": "> 0.9", "recall_at_1pct_fpr": "> 0.5"},
    description="Fraud scoring: seeded transactions (or yours: --input) -> point-in-time features -> distributed LightGBM "
                "-> evaluation vs rules -> batch scoring -> online smoke test on Serve.",
    serve_app="riskcontrol.serve:build_app",
    options={"model": "score.model_dir"},
    preflight=preflight,
    inputs={"path": TRANSACTIONS, "labels_path": LABELS},
    steps=[
        Step("data", data.run, makes=("transactions",),
             help="generate transactions with injected fraud, or ingest yours (--input, input.labels_path)"),
        Step("features", features.run, needs=("transactions",), makes=("features", "rejects"),
             help="point-in-time card and merchant features; invalid rows to rejects"),
        Step("train", train.run, needs=("features",), makes=("model",),
             help="distributed LightGBM on Ray Train (and in-process, to compare)"),
        Step("evaluate", evaluate.run, needs=("model", "features"), makes=("evaluation", *evaluate.PLOTS),
             help="AUPRC/ROC/recall@FPR vs rules; saves the alert threshold with the model"),
        Step("score", score.run, makes=("scores",),
             needs=lambda c: (() if c.score.model_dir else ("model",))
             + (() if c.input.path else ("features",)),
             help="batch scores with tiers and reasons (the run's model or --model; the run's features or --input)"),
        Step("online", online, needs=("model", "transactions"), when=lambda cfg: cfg.serve.smoke_requests > 0,
             help="deploy on Ray Serve and replay transactions through /score"),
    ],
    test_overrides=["data.rows=6000", "data.cards=120", "data.merchants=50", "data.days=10",
                    "train.compare_inprocess=false", "serve.smoke_requests=0"],
)
