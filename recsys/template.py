"""The recsys template's declaration (see :mod:`pipelines.template`)."""
from pipelines.template import Step, Template

from . import batch, data, evaluate, ranking, retrieval
from .config import TEMPLATE as NAME
from .config import load
from .inputs import INTERACTIONS, ITEMS

TEMPLATE = Template(
    name=NAME, load_config=load, key_metric="ndcg10_ranker",
    quality_bars={"ndcg10_ranker": ">= 1.3 * ndcg10_popularity", "recall50_retrieval": "> recall50_popularity",
                  "auc_ranker": "> 0.5"},
    description="Search and recommendation: synthetic interactions (or yours: --input FILE) -> two-tower "
                "retrieval -> DeepFM ranking -> evaluation -> batch top-k (online: python -m recsys.serve).",
    inputs={"path": INTERACTIONS, "items_path": ITEMS},
    serve_app="recsys.serve:app_builder",
    steps=[
        Step("data", data.run, makes=("users", "items", "impressions", "clicks", "queries", "dataset"),
             help="generate users, items, impressions, clicks and queries (with input.path: ingest yours)"),
        Step("retrieval", retrieval.run, needs=("items", "clicks", "queries"),
             makes=("retriever", "item_embeddings", "user_embeddings", "retriever_history",
                    "plot_retriever_loss"),
             help="train the two-tower retriever, embed items and users"),
        Step("ranking", ranking.run, needs=("impressions", "user_embeddings"),
             makes=("ranker", "ranker_history", "plot_ranker_loss"),
             help="feature snapshots and the DeepFM ranker"),
        Step("evaluate", evaluate.run, needs=("ranker",),
             makes=("eval_users", "eval_metrics", "plot_ndcg", "plot_recall", "plot_auc"),
             help="NDCG/Recall/AUC vs popularity and retrieval on the test slice"),
        Step("batch", batch.run, needs=("ranker",), makes=("recommendations",),
             help="top-k recommendations for every user (Parquet or MySQL)"),
    ],
    test_overrides=["data.num_users=400", "data.num_items=100", "retrieval.epochs=1", "ranker.epochs=1",
                    "retrieval.num_workers=1", "ranker.num_workers=1"],
)
