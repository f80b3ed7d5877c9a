"""``index.html`` in a run folder: one self-contained page (inline CSS, PNGs inlined as data URIs, no
network) built only from what the run folder holds, so ``adbray report RUN_DIR`` rebuilds it anywhere:

- the summary (``summary.json``, or the steps' ``<step>_summary.json`` of a step-by-step run, merged in
  step order): metrics with the template's quality bars, step times, rows, rejects, a failure if any;
- rejects by reason with a few examples (every output whose Parquet has the reject schema);
- the cluster the run joined (nodes, CPUs, GPUs, dashboard URL; the summary's ``cluster``);
- the resolved config (``config.yaml``, written by the template CLI);
- every output that is a PNG (the template's plots), then the list of outputs.
Written and read through :mod:`pipelines.io`, so it lands next to the outputs in ``oss://`` too.
"""
from __future__ import annotations

import base64
import html
import json
import operator
import re
from collections import Counter

from . import io

REPORT = "index.html"
CONFIG = "config.yaml"
MAX_REJECT_ROWS = 200_000  # rejects read for the by-reason table (the count comes from the summary)
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f5f5f5}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#0a7a2f;font-weight:600}.bad{color:#b00020;font-weight:600}.muted{color:#666}
.key{font-size:1.3em;background:#eef6ff;padding:.4em .8em;display:inline-block;border-radius:4px}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:480px;border:1px solid #eee}
figcaption{text-align:center;color:#444;font-size:.9em}pre{background:#f8f8f8;padding:.8em;overflow:auto;
font-size:.85em}code{font-size:.9em}
"""


class ReportError(ValueError):
    """A folder that is not a run folder (one line)."""


def config_yaml(cfg) -> str:
    """The resolved config as YAML (a pydantic model, a dataclass or a mapping)."""
    import dataclasses

    import yaml

    if hasattr(cfg, "model_dump"):
        data = cfg.model_dump(mode="json")
    elif dataclasses.is_dataclass(cfg):
        data = dataclasses.asdict(cfg)
    else:
        data = dict(cfg or {})
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


def write_config(run_dir: str, cfg) -> str:
    """Write the resolved config into the run folder (``config.yaml``)."""
    return io.write_bytes(io.join(run_dir, CONFIG), config_yaml(cfg).encode())


def read_summary(run_dir: str, step_order=()) -> dict:
    """The run's summary: ``summary.json``, else the step summaries merged in ``step_order`` (then by name)."""
    whole = io.join(run_dir, "summary.json")
    if io.exists(whole):
        return io.read_json(whole)
    found = sorted(u for u in io.list_files(run_dir) if re.search(r"/[^/]+_summary\.json$", u))
    if not found:
        raise ReportError(f"{run_dir}: no summary.json or <step>_summary.json: not a run folder")
    parts = [io.read_json(u) for u in found]
    rank = {name: i for i, name in enumerate(step_order)}
    parts.sort(key=lambda s: (rank.get(s.get("step"), len(rank)), str(s.get("step"))))
    merged = {**parts[-1], "step": "+".join(str(s.get("step")) for s in parts), "outputs": {}, "metrics": {},
              "rejects": 0, "rows": 0, "step_seconds": {}, "steps": []}
    for s in parts:
        merged["outputs"].update(s.get("outputs") or {})
        merged["metrics"].update(s.get("metrics") or {})
        merged["step_seconds"].update(s.get("step_seconds") or {})
        merged["steps"] += [x for x in s.get("steps") or [] if x not in merged["steps"]]
        merged["rejects"] += int(s.get("rejects") or 0)
        merged["rows"] += int(s.get("rows") or 0)
        if s.get("failure"):
            merged["failure"] = s["failure"]
    return merged


def check_bar(value, bar: str, metrics: dict | None = None) -> bool | None:
    """Whether ``value`` meets a bar: ``">= 0.6"``, or relative to another metric of the run,
    ``">= 1.3 * ndcg10_popularity"`` / ``"> random_success_rate"`` (None when it cannot be judged)."""
    m = re.fullmatch(r"\s*(>=|<=|>|<)\s*(?:(-?[0-9.]+(?:[eE][+-]?[0-9]+)?)\s*\*?\s*)?([A-Za-z_][\w.]*)?\s*", bar)
    if not m or not (m.group(2) or m.group(3)) or not _number(value):
        return None
    factor = float(m.group(2)) if m.group(2) else 1.0
    if m.group(3):
        other = (metrics or {}).get(m.group(3))
        if not _number(other):
            return None
        factor *= other
    return OPS[m.group(1)](value, factor)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _table(rows, header=None, num_cols=()) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(
        f"<td class=num>{c}</td>" if i in num_cols else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table>{head}{body}</table>"


def _rejects(outputs: dict) -> tuple[Counter, dict[str, list[str]]]:
    """Rejects by reason and a few example ids, from every output with the reject schema."""
    counts, examples = Counter(), {}
    for name, uri in outputs.items():
        if "reject" not in name or uri.endswith((".json", ".png")):
            continue
        try:
            table = io.read_table(uri)
        except (OSError, ValueError):
            continue
        ident = next((c for c in ("id", "path") if c in table.column_names), None)
        if not ident or not {"stage", "reason"} <= set(table.column_names):
            continue  # not a rejects table (the toolkit's id/stage/reason, or multimodal's path/stage/reason)
        for row in table.slice(0, MAX_REJECT_ROWS).select([ident, "stage", "reason"]).to_pylist():
            key = f"{row['stage']}: {row['reason']}"
            counts[key] += 1
            if len(examples.setdefault(key, [])) < 3:
                examples[key].append(str(row[ident]))
    return counts, examples


def _image(name: str, uri: str) -> str:
    try:
        data = io.read_bytes(uri)
    except (OSError, FileNotFoundError) as e:
        return f"<p class=bad>{html.escape(name)}: cannot read {html.escape(uri)}: {html.escape(str(e)[:120])}</p>"
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    return f'<figure><img src="{src}" alt="{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption></figure>'


def render(run_dir: str, summary: dict, config_text: str | None, key_metric: str | None = None,
           bars: dict[str, str] | None = None) -> str:
    """The page for one run folder (a string of HTML)."""
    e, bars = html.escape, bars or {}
    metrics, outputs = summary.get("metrics") or {}, summary.get("outputs") or {}
    title = e(str(summary.get("template")))
    head = f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title} run report</title>"
    parts = [f"{head}<style>{STYLE}</style></head><body>",
             f"<h1>{e(str(summary.get('template')))} &mdash; {e(str(summary.get('step')))}</h1>",
             f"<p class=muted>run folder <code>{e(run_dir)}</code></p>"]
    if summary.get("failure"):
        parts.append(f"<p class=bad>failed: {e(str(summary['failure']))}</p>")
    if key_metric and key_metric in metrics:
        parts.append(f"<p class=key>{e(key_metric)} = <b id=key-metric>{e(_fmt(metrics[key_metric]))}</b></p>")

    parts.append("<h2>Metrics</h2>")
    rows = []
    for name, value in metrics.items():
        verdict = check_bar(value, bars[name], metrics) if name in bars else None
        mark = "" if verdict is None else ("<span class=ok>pass</span>" if verdict else "<span class=bad>FAIL</span>")
        rows.append([e(name), e(_fmt(value)), e(bars.get(name, "")), mark])
    parts.append(_table(rows, ["metric", "value", "quality bar", ""], num_cols=(1,)))

    parts.append("<h2>Steps</h2>")
    seconds = summary.get("step_seconds") or {}
    parts.append(_table([[e(s), f"{float(t):.1f}"] for s, t in seconds.items()] +
                        [["<b>total</b>", f"<b>{sum(float(t) for t in seconds.values()):.1f}</b>"]],
                        ["step", "seconds"], num_cols=(1,)))
    parts.append(f"<p>rows written: <b>{e(str(summary.get('rows', 0)))}</b> &middot; "
                 f"rejects: <b>{e(str(summary.get('rejects', 0)))}</b></p>")

    counts, examples = _rejects(outputs)
    if counts:
        parts.append("<h2>Rejects by reason</h2>")
        parts.append(_table([[e(k), str(n), e(", ".join(examples[k]))] for k, n in counts.most_common()],
                            ["stage: reason", "rows", "examples"], num_cols=(1,)))

    cluster = summary.get("cluster") or {}
    parts.append("<h2>Cluster</h2>")
    if cluster:
        url = cluster.get("dashboard")
        link = f'<a href="{e(url)}">{e(url)}</a>' if url else "<span class=muted>not known</span>"
        parts.append(_table([["nodes", e(str(cluster.get("nodes")))], ["CPUs", e(str(cluster.get("cpus")))],
                             ["GPUs", e(str(cluster.get("gpus")))], ["dashboard", link]]))
    else:
        parts.append("<p class=muted>not recorded</p>")

    plots = {n: u for n, u in outputs.items() if str(u).lower().endswith(".png")}
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [_image(n, u) for n, u in plots.items()]

    parts.append("<h2>Config</h2>")
    parts.append(f"<pre>{e(config_text)}</pre>" if config_text else "<p class=muted>config.yaml not found</p>")
    parts.append("<h2>Outputs</h2>")
    parts.append(_table([[e(n), f"<code>{e(str(u))}</code>"] for n, u in outputs.items()], ["name", "where"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str, template=None) -> str:
    """Build ``index.html`` from what ``run_dir`` holds and write it there; its URI.
    ``template`` (a :class:`pipelines.template.Template`, found from the summary when None) gives the
    step order, the key metric and the quality bars."""
    summary = read_summary(run_dir, [s.name for s in template.steps] if template else ())
    if template is None:
        from .template import discover, load_template

        if summary.get("template") in discover():
            template = load_template(summary["template"])
            summary = read_summary(run_dir, [s.name for s in template.steps])
    config_uri = io.join(run_dir, CONFIG)
    config_text = io.read_bytes(config_uri).decode() if io.exists(config_uri) else None
    page = render(run_dir, summary, config_text, template.key_metric if template else None,
                  getattr(template, "quality_bars", None))
    return io.write_bytes(io.join(run_dir, REPORT), page.encode())
