"""Evaluate on the later time slice: NDCG@k, Recall@k and AUC for retrieval, ranker, popularity.

Relevant items of a user are the items they clicked in [t2, end). Popularity ranks
items by clicks before t2; retrieval ranks by the two-tower score; the ranker
re-orders the retriever's top ``candidates``. With user data that has no repeats
(``input.exclude_seen``), items a user interacted with before t2 are excluded from every
method's list alike. AUC is over the test impressions
(clicked vs not), scoring each by the ranker, the retrieval score and popularity.
Per-user metrics are computed by Ray Data actors; JSON + PNG go to the run folder.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.io import read_table, write_json, write_table
from pipelines.metrics import ndcg_at_k, recall_at_k, roc_auc
from pipelines.report import plot_bars
from pipelines.template import Run, StepResult

from . import config as C
from .common import data_shape
from .features import clicked_by_user
from .ranking import impression_examples, time_slice
from .score import RankerScorer, Recommender

METHODS = ("popularity", "retrieval", "ranker")


class UserEvaluator:
    """Ray Data stage: (user_id, relevant items) -> per-user NDCG/Recall for each method."""

    def __init__(self, run_dir: str, retrieval_cfg: dict, k: int, recall_k: int, popular: list[int]):
        self.rec = Recommender(run_dir, C.RetrievalConfig(**retrieval_cfg), features="eval")
        self.k, self.recall_k, self.popular = k, recall_k, np.asarray(popular)

    def __call__(self, batch: dict) -> dict:
        users = np.asarray(batch["user_id"], dtype=np.int64)
        depth = max(self.rec.candidates, self.recall_k, self.k)
        seen = self.rec.exclusions(users)  # the same exclusions for every method
        cand, cs = self.rec.retriever.for_users(users, depth, excluded=seen)
        c = self.rec.candidates
        ranked, _ = self.rec.rank(users, cand[:, :c], cs[:, :c])
        out = {"user_id": users}
        width = max(self.k, self.recall_k)
        popular = [self.popular[:width]] * len(users) if seen is None else \
            [_without(self.popular[:width + len(s)], s)[:width] for s in seen]
        lists = {"popularity": popular, "retrieval": cand, "ranker": ranked}
        for name, rows in lists.items():
            out[f"ndcg{self.k}_{name}"] = np.array([ndcg_at_k(r, set(rel), self.k)
                                                    for r, rel in zip(rows, batch["relevant"])])
            out[f"recall{self.recall_k}_{name}"] = np.array([recall_at_k(r, set(rel), self.recall_k)
                                                             for r, rel in zip(rows, batch["relevant"])])
        return out


def _without(ids: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    return ids[~np.isin(ids, excluded)]


class ImpressionScorer:
    """Ray Data stage: ranker rows -> label and the three methods' scores for AUC."""

    def __init__(self, run_dir: str):
        self.ranker = RankerScorer(run_dir)

    def __call__(self, batch: dict) -> dict:
        dense = np.asarray(batch["dense"], dtype=np.float32)
        return {"label": np.asarray(batch["label"]), "ranker": self.ranker(np.asarray(batch["sparse"]), dense),
                "retrieval": dense[:, 0], "popularity": dense[:, 1]}


def run(cfg: C.RecsysConfig, run: Run) -> StepResult:
    """Evaluate the run's models on the test slice; write eval_users, eval_metrics.json and PNGs."""
    import ray

    out = run.dir
    e = cfg.eval
    _, t2, end = data_shape(cfg, out).bounds
    impressions = read_table(f"{out}/impressions")
    users = clicked_by_user(impressions, t2, end).rename_columns(["user_id", "relevant"])
    item_clicks = read_table(f"{out}/features/eval/items").column("clicks").to_numpy()
    popular = np.argsort(-item_clicks, kind="stable").tolist()  # UserEvaluator takes the top, after exclusions
    per_user = ray.data.from_arrow(users).map_batches(
        UserEvaluator, fn_constructor_kwargs={"run_dir": out, "retrieval_cfg": cfg.retrieval.model_dump(),
                                              "k": e.k, "recall_k": e.recall_k, "popular": popular},
        batch_size=e.batch_size, num_cpus=e.num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=e.max_actors)).to_arrow_refs()
    per_user = pa.concat_tables(ray.get(per_user))
    scored = impression_examples(time_slice(impressions, t2, end), out, "eval").map_batches(
        ImpressionScorer, fn_constructor_kwargs={"run_dir": out}, batch_size=4096, num_cpus=e.num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=e.max_actors)).to_pandas()
    metrics = {"test_users": len(users), "test_impressions": len(scored)}
    for m in METHODS:
        metrics[f"ndcg{e.k}_{m}"] = float(np.nanmean(per_user.column(f"ndcg{e.k}_{m}").to_numpy()))
        metrics[f"recall{e.recall_k}_{m}"] = float(np.nanmean(per_user.column(f"recall{e.recall_k}_{m}").to_numpy()))
        metrics[f"auc_{m}"] = roc_auc(scored["label"], scored[m])
    metrics["ranker_vs_popularity"] = metrics[f"ndcg{e.k}_ranker"] / max(metrics[f"ndcg{e.k}_popularity"], 1e-9)
    outputs = {"eval_users": write_table(per_user, f"{out}/eval_users")}
    outputs["eval_metrics"] = write_json(f"{out}/eval_metrics.json", metrics)
    for name, label in (("ndcg", f"ndcg{e.k}"), ("recall", f"recall{e.recall_k}"), ("auc", "auc")):
        outputs[f"plot_{name}"] = plot_bars(f"{out}/eval_{name}.png", {m: metrics[f"{label}_{m}"] for m in METHODS},
                                            ylabel=label, title=f"{label} on the test slice ({len(users)} users)")
    return StepResult(outputs, metrics, rows=per_user.num_rows)


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("evaluate")
