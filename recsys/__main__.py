"""``python -m recsys``: data -> retrieval -> ranking -> evaluate -> batch, end to end."""
from __future__ import annotations

import time

from pipelines.cli import exit_with
from pipelines.report import summary

from . import batch, data, evaluate, ranking, retrieval
from . import config as C
from .common import step_command

STEPS = (("data", data.run), ("retrieval", retrieval.run), ("ranking", ranking.run),
         ("evaluate", evaluate.run), ("batch", batch.run))


def run(cfg: C.RecsysConfig, out: str) -> dict:
    """Run every step into ``out``; the summary merges the steps' outputs and metrics."""
    outputs, metrics, rejects, extra, seconds = {}, {}, 0, {}, {}
    for name, step in STEPS:
        t0 = time.perf_counter()
        result = step(cfg, out)
        seconds[name] = round(time.perf_counter() - t0, 1)
        outputs.update(result["outputs"])
        metrics.update(result["metrics"])
        rejects += result["rejects"]
        extra.update({k: v for k, v in result.items() if k == "model_version"})
    metrics["step_seconds"] = seconds
    return summary(C.TEMPLATE, "all", out, outputs, metrics, rejects=rejects,
                   steps=[name for name, _ in STEPS], **extra)


main = step_command(run, None, "Run the recsys template end to end (default configs/local.yaml).")


if __name__ == "__main__":
    exit_with(main)
