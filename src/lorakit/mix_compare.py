"""What a mix keeps: ``lorakit mix-compare``. One LoRA per task, mixed with every task-vector rule, scored per task.

Embedded default, offline: VADER's sentiment snippets come in four domains (movie reviews, Amazon product reviews,
tweets, NYT editorials; :func:`lorakit.assets.vader_sentiment`). On all-MiniLM-L6-v2 (a sequence classifier) it
trains one LoRA per domain, mixes them with :func:`lorakit.combine` (task arithmetic at a few weights; TIES, DARE
(linear and TIES) and magnitude pruning at a few densities), and reports held-out accuracy per domain and on average
for each single adapter, each mix, and one adapter trained on all domains together (the upper reference). A second
experiment moves the weights between two domains (``(w, 1 − w)``) to show the trade-off. Written to ``out``:
``results.json``, ``report.md``, ``per_task_accuracy.png``, ``tradeoff.png`` and a self-contained ``report.html``.

Heads: every task trains its own classifier head with its adapter (heads are not mixed: a mix is scored on task
``t`` with ``t``'s head, as in the TIES paper's multi-task protocol). A single adapter is scored with its own head
when the tasks share one label set, else with the scored task's head. Tasks with other label sets are accepted
(``--tasks movies,topics``: ``topics`` is the chatterbot corpus's question categories); the all-tasks reference then
needs one label set and is left out otherwise. Mixes are exact (``factorize`` at the mix's numerical rank) and are
merged into the base while scored, so their rank does not slow the evaluation.

Example:
    >>> from lorakit.mix_compare import MixCompareConfig
    >>> MixCompareConfig().tasks
    ['movies', 'amazon', 'tweets', 'nyt']
"""
from __future__ import annotations

import base64
import copy
import html
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .assets import chatterbot_topics, vader_sentiment
from .compare import resolve_model
from .config import AdapterConfig
from .io import atomic_write_text
from .mixing import mix_report
from .model import attach, combine, delete, merge, set_active, set_trainable, unmerge
from .train.trainer import TrainConfig, Trainer

__all__ = ["MixCompareConfig", "TASK_LOADERS", "mix_compare", "write_mix_report", "load_task"]


def _topics() -> list[dict]:
    return chatterbot_topics()


def _vader(domain: str) -> Callable[[], list[dict]]:
    def load() -> list[dict]:
        return vader_sentiment(domain)
    return load


#: task name -> loader of ``{"text", "label"}`` rows (the sentiment domains share the labels 0/1)
TASK_LOADERS: dict[str, Callable[[], list[dict]]] = {
    "movies": _vader("movies"), "amazon": _vader("amazon"), "tweets": _vader("tweets"), "nyt": _vader("nyt"),
    "topics": _topics,
}


@dataclass
class MixCompareConfig:
    """One mix comparison: tasks, training budget, the mixes tried and the trade-off pair."""

    model: str = "minilm"
    tasks: list[str] = field(default_factory=lambda: ["movies", "amazon", "tweets", "nyt"])
    steps: int = 40  # optimiser steps per task adapter
    all_steps: int | None = None  # the all-tasks reference (default: 2 × steps, on every task's rows)
    batch_size: int = 32
    max_length: int = 40
    eval_size: int = 120  # held-out rows per task
    lr: float = 2e-3
    r: int = 8
    alpha: float = 16.0
    # LoRA's original placement (attention query and value): the exact mixes are full-rank per layer, and SVD-ing
    # the 1536-wide feed-forward layers too would triple the mixing time
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    densities: list[float] = field(default_factory=lambda: [0.2, 0.5])
    # task arithmetic at these per-task weights (1/T is the plain average); the other rules use SUM_WEIGHT /
    # DISJOINT_WEIGHT below, their usual settings
    arithmetic_weights: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    tradeoff: list[str] | None = None  # two tasks (default: the first two)
    tradeoff_steps: int = 5  # weights w = 0, 1/(n-1), ..., 1 on the first task, 1 - w on the second
    seed: int = 0
    threads: int = 0  # torch threads; 0 = every core
    out: str = "mix_report"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_LOADERS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from: {', '.join(TASK_LOADERS)}")
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks needs at least two different tasks, got {self.tasks}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_size < 1 or self.max_length < 2:
            raise ValueError("steps, batch_size and eval_size must be >= 1 and max_length >= 2")
        if not self.densities or not all(0 < d <= 1 for d in self.densities):
            raise ValueError(f"densities {self.densities} are invalid; each must satisfy 0 < density <= 1")
        if self.tradeoff is None:
            self.tradeoff = list(self.tasks[:2])
        if len(self.tradeoff) != 2 or any(t not in self.tasks for t in self.tradeoff) or \
                self.tradeoff[0] == self.tradeoff[1]:
            raise ValueError(f"tradeoff {self.tradeoff} must name two different tasks of --tasks {self.tasks}")
        if self.tradeoff_steps < 2:
            raise ValueError("tradeoff_steps must be >= 2")
        if self.all_steps is None:
            self.all_steps = 2 * self.steps


#: per-task weights of the summing rules (magnitude_prune, dare_linear) and of the disjoint-mean rules (ties,
#: dare_ties): the sums scale like task arithmetic at 0.5, TIES's mean keeps each task's scale (its paper's λ = 1)
SUM_WEIGHT = 0.5
DISJOINT_WEIGHT = 1.0


def load_task(name: str, seed: int, eval_size: int) -> tuple[list[dict], list[dict], list]:
    """(train, held-out, label names) of one task, the rows shuffled by ``seed`` and labels made 0..n-1."""
    rows = [dict(r) for r in TASK_LOADERS[name]()]
    labels = sorted({r["label"] for r in rows}, key=str)
    ids = {lbl: i for i, lbl in enumerate(labels)}
    rows = [{"text": r["text"], "label": ids[r["label"]]} for r in rows]
    random.Random(seed).shuffle(rows)
    if len(rows) <= eval_size:
        raise ValueError(f"task {name!r}: {len(rows)} rows is not more than eval_size={eval_size}")
    return rows[eval_size:], rows[:eval_size], labels


def mix_plan(cfg: MixCompareConfig) -> list[dict]:
    """Every mix of all tasks that the comparison scores: ``{"label", "how", "weight", "density"}``."""
    plan = [{"label": f"task_arithmetic w={w:g}", "how": "task_arithmetic", "weight": w, "density": None}
            for w in cfg.arithmetic_weights]
    for how in ("magnitude_prune", "ties", "dare_linear", "dare_ties"):
        weight = DISJOINT_WEIGHT if how.endswith("ties") else SUM_WEIGHT
        plan += [{"label": f"{how} d={d:g}", "how": how, "weight": weight, "density": d} for d in cfg.densities]
    return plan


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
class _Bench:
    """The classifier with one head per task, the tokenised held-out sets and the scoring."""

    def __init__(self, cfg: MixCompareConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.cfg = cfg
        path = resolve_model(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.data = {t: load_task(t, cfg.seed, cfg.eval_size) for t in cfg.tasks}
        self.n_labels = {t: len(d[2]) for t, d in self.data.items()}
        torch.manual_seed(cfg.seed)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        self.head_init = {n: self._fresh_head(n) for n in set(self.n_labels.values())}
        self.heads: dict[str, Any] = {}
        self.eval_batches = {t: self._batches(d[1]) for t, d in self.data.items()}

    def _fresh_head(self, n_labels: int):
        import torch
        from torch import nn

        torch.manual_seed(self.cfg.seed)  # every task's head starts from the same seeded init
        head = nn.Linear(self.model.classifier.in_features, n_labels)
        return head.state_dict()

    def use_head(self, owner: str, n_labels: int) -> None:
        from torch import nn

        head = nn.Linear(self.model.classifier.in_features, n_labels)
        head.load_state_dict(self.heads[owner] if owner in self.heads else self.head_init[n_labels])
        self.model.classifier = head
        self.model.num_labels = n_labels  # the loss reads it

    def collate(self, rows: list[dict]) -> dict:
        import torch

        enc = self.tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                             max_length=self.cfg.max_length, return_tensors="pt")
        return {**enc, "labels": torch.tensor([r["label"] for r in rows])}

    def _batches(self, rows: list[dict], size: int = 100) -> list[dict]:
        rows = sorted(rows, key=lambda r: len(r["text"]))  # less padding; accuracy does not depend on order
        return [self.collate(rows[i:i + size]) for i in range(0, len(rows), size)]

    def train(self, name: str, rows: list[dict], n_labels: int, steps: int) -> dict[str, Any]:
        """Attach LoRA ``name``, train it with a fresh head on ``rows``; keeps the head as ``name``'s."""
        attach(self.model, AdapterConfig(r=self.cfg.r, alpha=self.cfg.alpha, targets=list(self.cfg.targets),
                                         seed=self.cfg.seed), name=name)
        set_active(self.model, name)
        for p in self.model.parameters():
            p.requires_grad_(False)
        set_trainable(self.model, name)
        self.use_head(name, n_labels)
        for p in self.model.classifier.parameters():
            p.requires_grad_(True)
        tc = TrainConfig(steps=steps, batch_size=self.cfg.batch_size, lr=self.cfg.lr, warmup_steps=max(1, steps // 5),
                         schedule="linear", seed=self.cfg.seed, log_every=max(1, steps // 20), group_by_length=True,
                         progress=False)
        t0 = time.perf_counter()
        result = Trainer(self.model, tc, rows, None, collate_fn=self.collate, task="classification").train()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.heads[name] = copy.deepcopy(self.model.classifier.state_dict())
        return {"seconds": time.perf_counter() - t0, "final_loss": result.losses[-1] if result.losses else None}

    def accuracy(self, task: str, head_owner: str) -> float:
        import torch

        self.use_head(head_owner, self.n_labels[task])
        right = total = 0
        with torch.inference_mode():
            for batch in self.eval_batches[task]:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                pred = self.model(**inputs).logits.argmax(-1)
                right += int((pred == batch["labels"]).sum())
                total += len(batch["labels"])
        return right / total

    def score_mix(self, name: str, tasks: list[str], weights: dict[str, float], how: str,
                  density: float | None) -> dict[str, Any]:
        """Combine, merge, score each task with its own head, then remove the mix (the model as before)."""
        opts: dict[str, Any] = {}
        if density is not None:
            opts["density"] = density
        if how.startswith("dare"):
            opts["seed"] = self.cfg.seed
        t0 = time.perf_counter()
        combine(self.model, weights, name=name, how=how, **opts)

        report = mix_report(self.model, name)
        mix_seconds = time.perf_counter() - t0
        set_active(self.model, name)
        merge(self.model, [name])
        try:
            acc = {t: self.accuracy(t, t) for t in tasks}
        finally:
            unmerge(self.model, [name])
            delete(self.model, name)
        ranks = [f.rank for f in report.layers.values()]
        return {"accuracy": acc, "average": sum(acc.values()) / len(acc), "mix_seconds": mix_seconds,
                "rank_min": min(ranks), "rank_max": max(ranks)}


def mix_compare(cfg: MixCompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, mix, score; write the report to ``cfg.out`` and return the results (what results.json holds)."""
    import torch

    start = time.perf_counter()
    threads = cfg.threads or _cores()
    torch.set_num_threads(threads)
    bench = _Bench(cfg)
    tasks = cfg.tasks
    one_label_set = len({tuple(bench.data[t][2]) for t in tasks}) == 1
    log(f"mix-compare: {len(tasks)} tasks ({', '.join(tasks)}) on {cfg.model}, {cfg.steps} steps each, "
        f"{threads} thread(s)")
    singles, training = [], {}
    for t in tasks:
        training[t] = bench.train(t, bench.data[t][0], bench.n_labels[t], cfg.steps)
        log(f"  trained {t}: {training[t]['seconds']:.0f} s")
    for t in tasks:
        set_active(bench.model, t)
        acc = {d: bench.accuracy(d, t if one_label_set else d) for d in tasks}
        singles.append({"label": f"only {t}", "kind": "single", "accuracy": acc,
                        "average": sum(acc.values()) / len(acc)})
    reference = None
    if one_label_set:
        union = [r for t in tasks for r in bench.data[t][0]]
        random.Random(cfg.seed).shuffle(union)
        training["all"] = bench.train("all_tasks", union, bench.n_labels[tasks[0]], cfg.all_steps)
        log(f"  trained the all-tasks reference: {training['all']['seconds']:.0f} s")
        acc = {d: bench.accuracy(d, "all_tasks") for d in tasks}
        reference = {"label": "all tasks together", "kind": "reference", "accuracy": acc,
                     "average": sum(acc.values()) / len(acc)}
    mixes = []
    for k, spec in enumerate(mix_plan(cfg)):
        scored = bench.score_mix(f"mix{k}", tasks, {t: spec["weight"] for t in tasks}, spec["how"], spec["density"])
        mixes.append({**spec, "kind": "mix", **scored})
        log(f"  {spec['label']}: average {scored['average']:.3f}")
    first, second = cfg.tradeoff
    tradeoff = []
    for how, density in (("task_arithmetic", None), ("ties", 0.5)):
        for i in range(cfg.tradeoff_steps):
            w = i / (cfg.tradeoff_steps - 1)
            scored = bench.score_mix(f"trade{len(tradeoff)}", [first, second], {first: w, second: 1 - w}, how,
                                     density)
            tradeoff.append({"how": how, "density": density, "weight_first": w, **scored})
    results = {
        "config": asdict(cfg), "tasks": tasks, "labels": {t: [str(x) for x in bench.data[t][2]] for t in tasks},
        "one_label_set": one_label_set, "singles": singles, "reference": reference, "mixes": mixes,
        "tradeoff": {"tasks": [first, second], "points": tradeoff}, "training": training,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cores": _cores(),
                        "threads": threads},
        "date": time.strftime("%Y-%m-%d %H:%M"), "total_seconds": time.perf_counter() - start,
    }
    write_mix_report(results, Path(cfg.out))
    log(f"report written to {cfg.out}/ ({results['total_seconds']:.0f} s)")
    return results


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------
def _rows(results: dict[str, Any]) -> list[dict]:
    return results["singles"] + ([results["reference"]] if results["reference"] else []) + results["mixes"]


def _table(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    lines = ["| model | " + " | ".join(tasks) + " | average |", "|---|" + "---:|" * (len(tasks) + 1)]
    best = max(r["average"] for r in results["mixes"]) if results["mixes"] else None
    for r in _rows(results):
        avg = f"{r['average']:.3f}"
        if r.get("kind") == "mix" and r["average"] == best:
            avg = f"**{avg}**"
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['accuracy'][t]:.3f}" for t in tasks) + f" | {avg} |")
    return "\n".join(lines)


def _tradeoff_table(results: dict[str, Any]) -> str:
    first, second = results["tradeoff"]["tasks"]
    lines = [f"| rule | weight on {first} | {first} | {second} |", "|---|---:|---:|---:|"]
    for p in results["tradeoff"]["points"]:
        rule = p["how"] + (f" d={p['density']:g}" if p["density"] else "")
        lines.append(f"| {rule} | {p['weight_first']:.2f} | {p['accuracy'][first]:.3f} | "
                     f"{p['accuracy'][second]:.3f} |")
    return "\n".join(lines)


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    rows = _rows(results)
    columns = tasks + ["average"]
    grid = [[r["accuracy"][t] for t in tasks] + [r["average"]] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3.5, 0.38 * len(rows) + 1.6), dpi=110)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=min(min(g) for g in grid), vmax=max(max(g) for g in grid),
                      aspect="auto")
    for i, values in enumerate(grid):
        for j, v in enumerate(values):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.xaxis.tick_top()
    for k in range(1, len(rows)):  # separate singles / reference / mixes
        if rows[k]["kind"] != rows[k - 1]["kind"]:
            ax.axhline(k - 0.5, color="black", linewidth=1.2)
    ax.set_title("Held-out accuracy per task: single adapters, all tasks together, and every mix", pad=28,
                 fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(out / "per_task_accuracy.png")
    plt.close(fig)

    first, second = results["tradeoff"]["tasks"]
    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=110)
    for how in dict.fromkeys(p["how"] for p in results["tradeoff"]["points"]):
        pts = [p for p in results["tradeoff"]["points"] if p["how"] == how]
        xs, ys = [p["accuracy"][first] for p in pts], [p["accuracy"][second] for p in pts]
        label = how + (f" d={pts[0]['density']:g}" if pts[0]["density"] else "")
        ax.plot(xs, ys, marker="o", label=label)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"w={p['weight_first']:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for r in results["singles"]:
        ax.scatter(r["accuracy"][first], r["accuracy"][second], marker="s", color="grey")
        ax.annotate(r["label"], (r["accuracy"][first], r["accuracy"][second]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7, color="grey")
    if results["reference"]:
        ref = results["reference"]
        ax.scatter(ref["accuracy"][first], ref["accuracy"][second], marker="*", s=120, color="black",
                   label="all tasks together")
    ax.set_xlabel(f"accuracy on {first}")
    ax.set_ylabel(f"accuracy on {second}")
    ax.set_title(f"Trade-off as the weight moves from {second} (w=0) to {first} (w=1)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png")
    plt.close(fig)
    return ["per_task_accuracy.png", "tradeoff.png"]


def _intro(results: dict[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    return (f"Model `{cfg['model']}`; tasks {', '.join(results['tasks'])} ({cfg['eval_size']} held-out rows each); "
            f"one LoRA (r={cfg['r']}, alpha={cfg['alpha']:g}, on {'/'.join(cfg['targets'])}) per task, "
            f"{cfg['steps']} steps of batch {cfg['batch_size']} at lr {cfg['lr']:g}, each with its own classifier head"
            + (f"; the all-tasks reference: {cfg['all_steps']} steps on every task's rows" if results["reference"]
               else "; no all-tasks reference (the tasks have different label sets)")
            + f". Mixes are exact (the mixed change at its numerical rank) and scored on each task with that task's "
            f"head; DARE seed {cfg['seed']}. Run {results['date']} on {env['cores']} CPU core(s), {env['threads']} "
            f"torch thread(s), torch {env['torch']}: {results['total_seconds']:.0f} s in total.")


_NOTES = ("Weights: task arithmetic at each listed per-task weight (1/T is the plain average); magnitude_prune and "
          f"dare_linear sum with weight {SUM_WEIGHT:g} per task; ties and dare_ties average the agreeing entries "
          f"with weight {DISJOINT_WEIGHT:g} per task. d = density, the fraction of each task vector kept. One seed; "
          "a held-out accuracy near 0.8 on {n} rows has a standard error of about ±{se:.1f} points.")


def write_mix_report(results: dict[str, Any], out: Path) -> None:
    """results.json, report.md, the two plots and a self-contained report.html in ``out`` (each file atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    n = results["config"]["eval_size"]
    notes = _NOTES.format(n=n, se=100 * math.sqrt(0.16 / n))
    plots = _plots(results, out)
    first, second = results["tradeoff"]["tasks"]
    md = ["# lorakit mix-compare: what a mix keeps", "", _intro(results), "", _table(results), "", notes, "",
          f"## Trade-off between {first} and {second}", "", _tradeoff_table(results), ""]
    md += [f"![{p}]({p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    images = "".join(f'<figure><img alt="{p}" src="data:image/png;base64,'
                     f'{base64.b64encode((out / p).read_bytes()).decode()}"></figure>' for p in plots)
    atomic_write_text(out / "report.html", f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lorakit mix-compare</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; width: 100%; font-size: 14px; }}
th, td {{ padding: 5px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f4f4f6; }} figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
.muted {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>lorakit mix-compare: what a mix keeps</h1>
<p>{html.escape(_intro(results).replace("`", ""))}</p>
{_html_table(results)}
<p class="muted">{html.escape(notes)}</p>
{images}
<h2>Trade-off between {html.escape(first)} and {html.escape(second)}</h2>
{_html_table_from_md(_tradeoff_table(results))}
</body></html>
""")


def _html_table(results: dict[str, Any]) -> str:
    return _html_table_from_md(_table(results))


def _html_table_from_md(md: str) -> str:
    """A Markdown table of this module (header, rule, rows; ``**bold**`` cells) as HTML."""
    lines = md.splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = []
    for row in cells[2:]:
        tds = []
        for c in row:
            text = html.escape(c.strip("*"))
            tds.append(f"<td><b>{text}</b></td>" if c.startswith("**") else f"<td>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
