"""Figures and tables that the scripts (and notebooks) share: training curves, run comparisons,
retrieval heatmaps and tables, MSA's selection next to dense attention or a retrieval needle.
Every figure function returns False (or None) instead of failing when matplotlib is not installed
(it is in the `dev` extra)."""

from __future__ import annotations

import json
import math
import pathlib
import textwrap

import numpy as np

LN2 = math.log(2.0)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (in a notebook: its inline backend, so
    returned figures show), or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    if "inline" not in str(matplotlib.get_backend()):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    return np.convolve(x, np.ones(width) / width, mode="valid")


# --------------------------------------------------------------------------------- one run


def plot_run(rows: list[dict], path: pathlib.Path, title: str) -> bool:
    """loss.png of one run: LM loss (bits/byte; train smoothed, val), for MSA the KL and recall, and with a
    task mix the share of retrieval answers predicted right (training rows and the val probe)."""
    plt = pyplot()
    if plt is None:
        return False
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    has_msa = any(r.get("block_recall") is not None for r in evals)
    has_answers = any(r.get("val_answer_bytes") is not None for r in evals)
    n = 1 + 2 * has_msa + has_answers
    fig, axes = plt.subplots(1, n, figsize=(5 * n if n > 1 else 6, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train]) / LN2
        w = max(1, min(20, loss.size // 10))
        ax.plot(steps[w - 1:], _smooth(loss, w), lw=1, label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", label="val")
    ax.set(xlabel="step", ylabel="LM loss (bits/byte)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if has_msa:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in train], [r["kl"] for r in train], lw=1, label="train KL (sum over layers)")
        ax.set(xlabel="step", ylabel="index KL", title="index KL (support changes at the switch)")
        ax.grid(alpha=0.3)
        ax = axes[0, 2]
        ax.plot([r["step"] for r in evals], [r["block_recall"] for r in evals], "o-", label="block recall")
        ax.plot([r["step"] for r in evals], [r["score_recall"] for r in evals], "s-", label="score recall")
        ax.set(xlabel="step", ylim=(0, 1.02), title="selection recall (val)")
        ax.grid(alpha=0.3)
        ax.legend()
    if has_answers:  # the retrieval rows of a task mix: training batches (smoothed) and the val probe
        ax = axes[0, -1]
        tr = [r for r in train if r.get("answer_bytes") is not None]
        if tr:
            acc = np.array([r["answer_bytes"] for r in tr])
            w = max(1, min(20, acc.size // 10))
            ax.plot([r["step"] for r in tr][w - 1:], _smooth(acc, w), lw=1, label="answer bytes right (train)")
        ev = [r for r in evals if r.get("val_answer_bytes") is not None]
        ax.plot([r["step"] for r in ev], [r["val_answer_bytes"] for r in ev], "o-", label="answer bytes right (val)")
        ax.plot([r["step"] for r in ev], [r["val_answer_exact"] for r in ev], "s-", label="whole answer right (val)")
        ns = [r for r in ev if r.get("val_needle_selected") is not None]  # MSA: the index routes the answer there
        if ns:
            x = [r["step"] for r in ns]
            ax.plot(x, [r["val_needle_selected"] for r in ns], "^:", label="needle selected (val, mean)")
            if ns[-1].get("val_needle_selected_groups") is not None:  # often one (layer, KV group) retrieves
                ax.plot(x, [np.max(r["val_needle_selected_groups"]) for r in ns], "v:",
                        label="needle selected (val, best layer and group)")
            if ns[-1].get("val_needle_selected_chance") is not None:
                ax.axhline(ns[-1]["val_needle_selected_chance"], color="gray", ls="-.", lw=1,
                           label="needle selected by a uniform choice")
        ax.set(xlabel="step", ylim=(0, 1.02), title="retrieval rows (teacher-forced)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if has_msa:
        switch = next((r["step"] for r in train if r.get("sparse")), None)
        for a in axes[0]:
            if switch is not None and switch > 1:
                a.axvline(switch - 1, color="gray", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------- comparing runs


def run_labels(run_dirs) -> list[str]:
    """One label per run directory for tables, legends and file names: its folder name, prefixed by
    the parent folder's name where two runs share it (runs/a/dense, runs/b/dense -> a-dense,
    b-dense), then numbered if still equal."""
    paths = [pathlib.Path(r) for r in run_dirs]
    names = [p.name for p in paths]
    labels = [f"{p.resolve().parent.name}-{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    out: list[str] = []
    for label in labels:
        k, base = 2, label
        while label in out:
            label, k = f"{base}-{k}", k + 1
        out.append(label)
    return out


def load_run_metrics(run_dir: str | pathlib.Path) -> dict:
    """{name, cfg, rows, summary, offset} of a run directory; offset = the dense step a converted
    (init_from) run started from, so that its curves line up with the dense run's."""
    run_dir = pathlib.Path(run_dir)
    for name in ("config.json", "metrics.jsonl"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir}: no {name} (is it a training run directory?)")
    cfg = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    offset = int(cfg.get("init_loaded_step") or 0)
    return dict(name=run_dir.name, cfg=cfg, rows=rows, summary=summary, offset=offset)


def summarize(run: dict) -> dict:
    """One table row of a loaded run: last eval, mean train loss of the last 10% of steps, speed."""
    train = [r for r in run["rows"] if r["kind"] == "train"]
    evals = [r for r in run["rows"] if r["kind"] == "eval"]
    tail = train[-max(1, len(train) // 10):]
    tps = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    last = evals[-1] if evals else {}
    cfg = run["cfg"]
    return dict(
        run=run["name"],
        attention=cfg["attention"],
        init=f"dense @ {run['offset']}" if cfg.get("init_from") else "scratch",
        steps=train[-1]["step"] if train else 0,
        total_steps=(train[-1]["step"] if train else 0) + run["offset"],
        n_params=run["summary"].get("n_params"),
        train_loss=float(np.mean([r["loss"] for r in tail])) if tail else None,
        val_loss=last.get("val_loss"),
        val_bpb=last.get("val_bpb"),
        block_recall=last.get("block_recall"),
        score_recall=last.get("score_recall"),
        tokens_per_s=float(np.median(tps)) if tps else None,
        wall_s=run["summary"].get("wall_s"),
        seq_len=cfg["seq_len"],
        mesh=_mesh_text(run["summary"].get("env", {}).get("mesh"), cfg.get("mesh")),
        step_s=cfg["batch_size"] * cfg["seq_len"] / float(np.median(tps)) if tps else None,
        peak_memory_gib=run["summary"].get("peak_memory_gib"),  # per device, GPU runs only
    )


def _mesh_text(shape: dict | None, spec: str | None) -> str:
    """A run's mesh as its axes of size > 1 ("context=4,data=2"; "1 device"), from summary.json's
    env.mesh, else the --mesh flag (older runs), else "–"."""
    if shape:
        return ",".join(f"{k}={v}" for k, v in shape.items() if v > 1) or "1 device"
    return spec or "–"


def markdown_table(table: list[dict]) -> str:
    """The rows of `summarize` as a Markdown table (losses in nats per byte)."""
    def f(x, fmt):
        return "–" if x is None else format(x, fmt)

    lines = ["| run | attention | init | params | steps (total) | train loss | val loss | val bits/byte | "
             "block recall | score recall | tokens/s | T | mesh | s/step | peak GiB/device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        params = "–" if r.get("n_params") is None else f"{r['n_params'] / 1e6:.2f}M"
        lines.append(f"| {r['run']} | {r['attention']} | {r['init']} | {params} | {r['steps']} ({r['total_steps']}) "
                     f"| {f(r['train_loss'], '.3f')} | {f(r['val_loss'], '.3f')} | {f(r['val_bpb'], '.3f')} | "
                     f"{f(r['block_recall'], '.3f')} | {f(r['score_recall'], '.3f')} | {f(r['tokens_per_s'], ',.0f')} | "
                     f"{r['seq_len']} | {r['mesh']} | {f(r['step_s'], '.3f')} | {f(r['peak_memory_gib'], '.1f')} |")
    return "\n".join(lines)


def plot_compare(runs: list[dict], path: pathlib.Path, title: str) -> bool:
    """Loss curves of several loaded runs on one "total steps" axis (+ recall of the MSA runs)."""
    plt = pyplot()
    if plt is None:
        return False
    has_msa = any(r["cfg"]["attention"] == "msa" for r in runs)
    fig, axes = plt.subplots(1, 2 if has_msa else 1, figsize=(13 if has_msa else 7, 4.5), squeeze=False)
    for i, run in enumerate(runs):
        color = f"C{i}"
        train = [r for r in run["rows"] if r["kind"] == "train"]
        evals = [r for r in run["rows"] if r["kind"] == "eval"]
        if train:
            steps = np.array([r["step"] for r in train]) + run["offset"]
            loss = np.array([r["loss"] for r in train]) / LN2
            w = max(1, min(20, loss.size // 10))
            axes[0, 0].plot(steps[w - 1:], _smooth(loss, w), color=color, lw=1, alpha=0.6, label=f"{run['name']} train")
        if evals:
            axes[0, 0].plot([r["step"] + run["offset"] for r in evals], [r["val_bpb"] for r in evals], "o-",
                            color=color, label=f"{run['name']} val")
        if has_msa and run["cfg"]["attention"] == "msa" and evals:
            x = [r["step"] + run["offset"] for r in evals]
            axes[0, 1].plot(x, [r["block_recall"] for r in evals], "o-", color=color, label=f"{run['name']} block")
            axes[0, 1].plot(x, [r["score_recall"] for r in evals], "s--", color=color, label=f"{run['name']} score")
        if run["offset"]:
            axes[0, 0].axvline(run["offset"], color=color, ls=":", lw=1)
        warm = run["cfg"].get("msa_warmup_steps") if run["cfg"]["attention"] == "msa" else None
        if warm:
            axes[0, 0].axvline(min(warm, run["cfg"]["steps"]) + run["offset"], color=color, ls="--", lw=0.8)
    axes[0, 0].set(xlabel="total steps (a converted run starts at its dense step; dashed: end of MSA warmup)",
                   ylabel="LM loss (bits/byte)", title=title)
    axes[0, 0].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if has_msa:
        axes[0, 1].set(xlabel="total steps", ylim=(0, 1.02), title="MSA selection recall (val)")
        axes[0, 1].grid(alpha=0.3)
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare_runs(run_dirs, out: str | pathlib.Path, title: str | None = None) -> dict:
    """Load runs, write compare.json (+ compare.png) under `out`; returns {table, markdown, plotted}."""
    runs = [load_run_metrics(r) for r in run_dirs]
    for r, label in zip(runs, run_labels(run_dirs)):
        r["name"] = label
    table = [summarize(r) for r in runs]
    md = markdown_table(table)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = runs[0]["cfg"]
    plotted = plot_compare(runs, out / "compare.png", title or f"T={c['seq_len']}, batch {c['batch_size']} ({c['preset']})")
    (out / "compare.json").write_text(json.dumps(dict(table=table, markdown=md), indent=1))
    return dict(table=table, markdown=md, plotted=plotted)


# ------------------------------------------------------------------------------ retrieval


def stage_curves(stages: list[tuple[str, list[dict]]], *, title: str = ""):
    """A run continued in stages (e.g. a length curriculum: `--init-from` at another `--seq-len`) on
    one step axis: each stage's metrics rows (`metrics.jsonl`) after the previous stage's last step.
    Left: validation LM loss (bits/byte); right: the retrieval probe's answers (`val_answer_exact`,
    `val_answer_bytes`). Stages are shaded and labelled. -> a matplotlib figure (None without
    matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 4))
    offset = 0
    for i, (label, rows) in enumerate(stages):
        evals = [r for r in rows if r["kind"] == "eval"]
        last = max((r["step"] for r in rows), default=0)
        for ax in (ax_l, ax_r):
            ax.axvspan(offset, offset + last, color=f"C{i}", alpha=0.08)
        ax_r.text(offset + last / 2, 1.02, label, ha="center", va="bottom", fontsize=8)
        steps = [offset + r["step"] for r in evals]
        ax_l.plot(steps, [r["val_bpb"] for r in evals], "o-", color=f"C{i}")
        for key, marker, name in (("val_answer_exact", "s-", "whole answer"), ("val_answer_bytes", "o--", "answer bytes")):
            pts = [(s, r[key]) for s, r in zip(steps, evals) if r.get(key) is not None]
            if pts:
                ax_r.plot(*zip(*pts), marker, color=f"C{i}", label=name if i == 0 else None)
        offset += last
    ax_l.set(xlabel="step (all stages)", ylabel="val LM loss (bits/byte)", title=title)
    ax_r.set(xlabel="step (all stages)", ylabel="share right (val probe)", ylim=(0, 1.12))
    ax_r.legend(loc="center left")
    for ax in (ax_l, ax_r):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def block_scores_figure(scores: dict[str, np.ndarray], selected: dict[str, np.ndarray], *, needle_block: int,
                        title: str = ""):
    """One query's score per KV block under several pooling rules (`scores`: name -> [n_blocks]) and
    the blocks each rule's top-k picks (`selected`: name -> block ids), with the needle's block
    marked: why MSA pools a block's index scores by max. -> a matplotlib figure (None without
    matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(scores), 1, figsize=(12, 2.2 * len(scores)), sharex=True, squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], scores.items()):
        x = np.asarray(x)
        picked = np.zeros(x.size, bool)
        picked[[b for b in np.asarray(selected[name]).ravel() if 0 <= b < x.size]] = True
        ax.bar(np.arange(x.size), x, color=np.where(picked, "C1", "C7"), width=0.9)
        ax.axvline(needle_block, color="C3", ls="--", lw=1)
        hit = "picks" if picked[needle_block] else "misses"
        ax.set(ylabel=name, title=f"{name}: top-{picked.sum()} (orange) {hit} the needle's block (red line)")
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel("KV block")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def retrieval_table(rows: list[dict], depths: list[float], metric: str = "accuracy") -> str:
    """Text table: one line per (run, task, length), one column per needle depth, and the mean."""
    head = ["run", "task", "length"] + [f"d={d:g}" for d in depths] + ["mean"]
    table = [head]
    keys = dict.fromkeys((r["run"], r["task"], r["context_len"]) for r in rows)
    for run, task, T in keys:
        accs = [r[metric] for r in rows if (r["run"], r["task"], r["context_len"]) == (run, task, T)]
        table.append([run, task, str(T)] + [f"{a:.2f}" for a in accs] + [f"{sum(accs) / len(accs):.2f}"])
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in table]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def retrieval_markdown(rows: list[dict], depths: list[float]) -> str:
    """Markdown table of exact match with 95% Wilson intervals: one line per (run, task, length),
    one column per needle depth, and all depths pooled. Rows of `retrieval.evaluate` (+ "run")."""
    from msa_jax.retrieval import wilson_interval

    def cell(k: int, n: int) -> str:
        lo, hi = wilson_interval(k, n)
        return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = ["| run | task | length | " + " | ".join(f"depth {d:g}" for d in depths) + " | all depths |",
             "|---|---|---|" + "---|" * (len(depths) + 1)]
    keys = dict.fromkeys((r["run"], r["task"], r["context_len"]) for r in rows)
    for run, task, T in keys:
        sub = [r for r in rows if (r["run"], r["task"], r["context_len"]) == (run, task, T)]
        by_depth = {r["depth"]: r for r in sub}
        cells = [cell(by_depth[d]["correct"], by_depth[d]["n"]) if d in by_depth else "–" for d in depths]
        pooled = cell(sum(r["correct"] for r in sub), sum(r["n"] for r in sub))
        lines.append(f"| {run} | {task} | {T} | " + " | ".join(cells) + f" | {pooled} |")
    return "\n".join(lines)


def differences_markdown(rows: list[dict], margin: float) -> str:
    """Markdown table of `differences.compare` rows: each run's exact match against the baseline's,
    the difference with its 95% interval, and the verdict against `margin`."""
    pts = f"{100 * margin:g} points"
    per_depth = any(r["depth"] is not None for r in rows)
    lines = ["| run | baseline | task | length |" + (" depth |" if per_depth else "")
             + f" n | run | baseline | difference [95% CI] | paired | verdict (-{pts}) | examples for +-{pts} |",
             "|---|---|---|---|" + ("---|" if per_depth else "") + "---|---|---|---|---|---|---|"]
    for r in rows:
        n = str(r["n"]) if r["n"] == r["baseline_n"] else f"{r['n']} / {r['baseline_n']}"
        paired = f"yes ({r['discordant']:.2f} differ)" if r["paired"] else "no"
        depth = ("all" if r["depth"] is None else f"{r['depth']:g}") + " | " if per_depth else ""
        lines.append(f"| {r['run']} | {r['baseline']} | {r['task']} | {r['context_len']} | {depth}{n} | "
                     f"{r['accuracy']:.2f} | {r['baseline_accuracy']:.2f} | {100 * r['difference']:+.1f} "
                     f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] | {paired} | {r['verdict']} | "
                     f"{r['examples_needed']} |")
    return "\n".join(lines)


def spread_markdown(rows: list[dict], margin: float) -> str:
    """Markdown table of `differences.spread` rows: reruns of one recipe, their accuracies, and how
    much of their spread is the evaluation's sampling and how much training."""
    lines = [f"| runs | task | length | n | accuracies | sd | sampling sd | between-run sd | a new run (95%) | "
             f"runs per recipe for +-{100 * margin:g} points |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {', '.join(r['runs'])} | {r['task']} | {r['context_len']} | {r['n']} | "
                     f"{' / '.join(f'{a:.2f}' for a in r['accuracies'])} | {100 * r['sd']:.1f} | "
                     f"{100 * r['sampling_sd']:.1f} | {100 * r['between_sd']:.1f} | "
                     f"[{r['new_run_low']:.2f}, {r['new_run_high']:.2f}] | {r['runs_needed']} |")
    return "\n".join(lines)


def recipes_markdown(rows: list[dict]) -> str:
    """Markdown table of `differences.compare_recipes` rows: each recipe's runs against the baseline
    recipe's, the difference of the means with its 95% interval from the run-to-run spread."""
    per_depth = any(r.get("depth") is not None for r in rows)
    lines = ["| recipe | baseline | metric | task | length |" + (" depth |" if per_depth else "")
             + " runs | baseline runs | difference [95% CI] | df | verdict |",
             "|---|---|---|---|---|" + ("---|" if per_depth else "") + "---|---|---|---|---|"]
    for r in rows:
        depth = ("–" if r.get("depth") is None else f"{r['depth']:g}") + " | " if per_depth else ""
        bpb = r["metric"] == "val bits/byte"
        fmt = (lambda v: f"{v:.3f}") if bpb else (lambda v: f"{v:.2f}")  # noqa: E731
        unit = "%" if bpb else ""
        diff = (f"{100 * r['difference']:+.1f}{unit} [{100 * r['ci_low']:+.1f}{unit}, {100 * r['ci_high']:+.1f}{unit}]")
        lines.append(f"| {r['recipe']} | {r['baseline']} | {r['metric']} | {r['task'] or '–'} | "
                     f"{r['context_len'] or '–'} | {depth}{' / '.join(map(fmt, r['values']))} | "
                     f"{' / '.join(map(fmt, r['baseline_values']))} | {diff} | {r['df']:.1f} | {r['verdict']} |")
    return "\n".join(lines)


def plot_recipes(cells: list[dict], recipes: dict[str, list[str]], path: pathlib.Path, title: str = "") -> bool:
    """Every run's exact match (all depths pooled, 95% Wilson interval: the evaluation's sampling) by
    recipe, one panel per (task, length) all runs share; shaded: where one more run of the first
    recipe would land (95%, `differences.run_spread`; needs >= 2 runs of it). Shows whether the runs
    of a recipe differ by more than their evaluations can tell, and where other recipes' runs fall
    against that. False (nothing drawn) without matplotlib or shared cells."""
    from msa_jax.differences import cells_by_run, pool, run_spread
    from msa_jax.retrieval import wilson_interval

    plt = pyplot()
    runs = [r for rs in recipes.values() for r in rs]
    by_run = cells_by_run(cells)
    if plt is None or any(r not in by_run for r in runs):
        return False
    shared = sorted(set.intersection(*(set(by_run[r]) for r in runs)))  # sorted: sums in one order
    panels = sorted({k[:2] for k in shared})
    if not panels:
        return False
    first = next(iter(recipes.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.4, 0.42 * len(runs) + 1.2) * len(panels), 3.6),
                             squeeze=False, sharey=True)
    for ax, (task, T) in zip(axes[0], panels):
        keys = [k for k in shared if k[:2] == (task, T)]
        counts = {r: pool(by_run[r][k] for k in keys)[:2] for r in runs}
        if len(first) >= 2:
            sp = run_spread([counts[r] for r in first])
            ax.axhspan(sp["new_run_low"], sp["new_run_high"], color="gray", alpha=0.15, lw=0)
            ax.axhline(sp["mean"], color="gray", lw=0.8, ls="--")
        x = 0
        for i, (name, rs) in enumerate(recipes.items()):
            for r in rs:
                k, n = counts[r]
                lo, hi = wilson_interval(k, n)
                ax.errorbar(x, k / n, yerr=[[k / n - lo], [hi - k / n]], fmt="o", ms=4, capsize=2, color=f"C{i % 10}",
                            label=name if r == rs[0] else None)
                x += 1
        ax.set_xticks(range(len(runs)), runs, rotation=60, ha="right", fontsize=7)
        ax.set(title=f"{task}, {T // 1024}K" if T % 1024 == 0 else f"{task}, {T}", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("exact match, all depths (95% CI)")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title or f"shaded: one more run of {next(iter(recipes))} (95%, from its runs' spread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_differences(rows: list[dict], path: pathlib.Path, margin: float, title: str = "") -> bool:
    """Forest plot of `differences.compare` rows (pooled over depths): one panel per task, one line
    per (run, length), the difference from the baseline in exact-match points with its 95% interval,
    the margin shaded. False (nothing drawn) without matplotlib or rows."""
    plt = pyplot()
    rows = [r for r in rows if r["depth"] is None]
    if plt is None or not rows:
        return False
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    keys = list(dict.fromkeys((r["run"], r["context_len"]) for r in rows))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    colors = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    lo = min(-100 * margin, *(100 * r["ci_low"] for r in rows))
    hi = max(100 * margin, *(100 * r["ci_high"] for r in rows))
    xlim = (max(lo - 5, -101), min(hi + 5, 101))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 1.6 + 0.3 * len(keys)), squeeze=False,
                             sharey=True)
    for ax, task in zip(axes[0], tasks):
        ax.axvspan(-100 * margin, 100 * margin, color="green", alpha=0.12, lw=0)
        ax.axvline(0, color="gray", lw=0.8)
        for y, (run, T) in enumerate(keys):
            r = next((r for r in rows if (r["run"], r["context_len"], r["task"]) == (run, T, task)), None)
            if r is not None:
                d, lo, hi = (100 * r[k] for k in ("difference", "ci_low", "ci_high"))
                ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="o" if r["paired"] else "s", ms=4, capsize=2,
                            color=colors[run], mfc=colors[run] if r["paired"] else "white")
        ax.set(title=task, xlabel="exact match - baseline (points, 95% CI)", xlim=xlim)
        ax.grid(alpha=0.3, axis="x")
    base = rows[0]["baseline"]
    axes[0, 0].set_yticks(range(len(keys)), [f"{run} {T // 1024}K" if T % 1024 == 0 else f"{run} {T}" for run, T in keys])
    axes[0, 0].invert_yaxis()
    fig.suptitle(title or f"against {base}; shaded: +-{100 * margin:g} points; filled: paired, open: unpaired",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_retrieval(rows: list[dict], runs: list[str], tasks: list[str], path: pathlib.Path,
                   metric: str = "accuracy") -> bool:
    """Heatmaps of `metric`: one row of panels per run, one column per task, depth x length."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(len(runs), len(tasks), figsize=(4.2 * len(tasks), 2.2 + 1.2 * len(runs)), squeeze=False)
    for i, run in enumerate(runs):
        for j, task in enumerate(tasks):
            sub = [r for r in rows if r["run"] == run and r["task"] == task]
            lengths = sorted({r["context_len"] for r in sub})
            depths = sorted({r["depth"] for r in sub})
            grid = np.array([[next(r[metric] for r in sub if r["context_len"] == T and r["depth"] == d)
                              for d in depths] for T in lengths])
            ax = axes[i, j]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            for (a, b), v in np.ndenumerate(grid):
                ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_yticks(range(len(lengths)), [str(T) for T in lengths])
            ax.set_xlabel("needle depth")
            if j == 0:
                # a long run name wraps (vertical text: each line is a column) to stay beside its row
                ax.set_ylabel("\n".join(textwrap.wrap(run, 14) + ["context length"]))
            if i == 0:
                ax.set_title(f"{task} ({'exact match' if metric == 'accuracy' else 'answer bytes right'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def retrieval_by_length(rows: list[dict], runs: list[str], tasks: list[str], path: pathlib.Path,
                        train_len: int | None = None) -> bool:
    """Exact match pooled over needle depths against context length, with 95% Wilson intervals: one
    panel per task, one line per run (rows of `retrieval.evaluate` + "run"); train_len: a dashed line
    at the training length. False (nothing drawn) without matplotlib or with fewer than two lengths."""
    from msa_jax.retrieval import wilson_interval

    plt = pyplot()
    lengths = sorted({r["context_len"] for r in rows})
    if plt is None or len(lengths) < 2:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        for run in runs:
            pts = []
            for T in lengths:
                sub = [r for r in rows if r["run"] == run and r["task"] == task and r["context_len"] == T]
                if sub:
                    k, n = sum(r["correct"] for r in sub), sum(r["n"] for r in sub)
                    pts.append((T, k / n, *wilson_interval(k, n)))
            if pts:
                T, acc, lo, hi = map(np.array, zip(*pts))
                line, = ax.plot(T, acc, "o-", label=run)
                ax.fill_between(T, lo, hi, color=line.get_color(), alpha=0.15)
        if train_len:
            ax.axvline(train_len, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{T // 1024}K" if T % 1024 == 0 else str(T) for T in lengths])
        ax.set(title=task, xlabel="context length", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("exact match, all depths (95% CI)")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def eval_cells(folders, context_len: int) -> dict[tuple[str, float], dict]:
    """{(task, depth): row} of `eval_retrieval.py` evaluations (folders holding results.json) at one
    context length: e.g. a main evaluation and one near the start of the context, merged. Where two
    folders have the same cell the first wins."""
    out = {}
    for folder in reversed(list(folders)):
        for r in json.loads((pathlib.Path(folder) / "results.json").read_text())["rows"]:
            if r["context_len"] == context_len:
                out[(r["task"], r["depth"])] = r
    return out


def stretch_depth(depth: float, head: float = 0.1) -> float:
    """An x position for a needle depth that spreads the context's first `head` over half the axis
    (depths 0-0.1 hold most of the interesting cells when needles are drawn near the start)."""
    return depth / head * 0.5 if depth <= head else 0.5 + (depth - head) / (1 - head) * 0.5


def exact_match_by_depth(ax, cells: dict[tuple[str, float], dict], task: str, x_of=float, **kw):
    """Draw one task's exact match against needle depth with its 95% intervals on `ax` (cells from
    `eval_cells`; `x_of` maps a depth to x, e.g. `stretch_depth`; kw go to `errorbar`)."""
    sub = sorted((r for (t, _), r in cells.items() if t == task), key=lambda r: r["depth"])
    acc = np.array([r["accuracy"] for r in sub])
    err = [acc - [r["ci_low"] for r in sub], [r["ci_high"] for r in sub] - acc]
    return ax.errorbar([x_of(r["depth"]) for r in sub], acc, yerr=err, capsize=3, **kw)


def exact_match_by_depth_figure(series: dict[str, tuple[dict, dict]], tasks: list[str], path: pathlib.Path, *,
                                title: str = "{task}", stretch: bool = True, legend_cols: int = 2,
                                figsize=(15, 4.8)) -> bool:
    """One panel per task, each series' exact match against needle depth with its 95% intervals
    (`{label: (cells, errorbar kwargs)}`, cells from `eval_cells`); stretch: the context's first tenth
    over half of each axis (`stretch_depth`); the legend below the panels. Writes `path`; False without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=figsize, sharey=True, squeeze=False)
    x_of = stretch_depth if stretch else float
    for label, (cells, kw) in series.items():
        for ax, task in zip(axes[0], tasks):
            exact_match_by_depth(ax, cells, task, x_of, label=label, **kw)
    for ax, task in zip(axes[0], tasks):
        ax.set(title=title.format(task=task), ylim=(-0.03, 1.03),
               xlabel="needle depth (0: start of the context; first tenth stretched)" if stretch else "needle depth")
        if stretch:
            ticks = [0, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1]
            ax.set_xticks([stretch_depth(t) for t in ticks], [f"{t:g}" for t in ticks])
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("exact match (50 examples per point)")
    rows = -(-len(series) // legend_cols)
    fig.tight_layout(rect=(0, 0.035 + 0.035 * rows, 1, 1))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=legend_cols, fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def selection_figure(scores, block_idx, mass, *, batch: int = 0, group: int = 0, title: str = ""):
    """One (sequence, KV group) in three panels, queries down, KV blocks across: the index branch's
    block scores (max-pooled index scores, `ops.reference.block_scores`), the blocks `select_blocks`
    kept, and dense attention's mass per block (`ops.reference.block_mass`: what the selection should
    cover). scores, mass [B, H_kv, T, n_blocks]; block_idx [B, T, H_kv, top_k]. Returns the figure
    (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    sc = np.asarray(scores[batch, group], np.float32)
    ms = np.asarray(mass[batch, group], np.float32)
    ids = np.asarray(block_idx[batch, :, group])
    chosen = np.zeros(sc.shape, bool)
    rows, slots = np.nonzero(ids >= 0)
    chosen[rows, ids[rows, slots]] = True
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    panels = [(np.where(np.isfinite(sc), sc, np.nan), "index branch: block scores", "viridis"),
              (chosen.astype(float), "selected blocks (top-k, local always)", "Greys"),
              (np.where(np.isfinite(sc), ms, np.nan), "dense attention mass per block", "magma")]  # visible blocks
    for ax, (img, name, cmap) in zip(axes, panels):
        im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap=cmap)
        ax.set(title=name, xlabel="KV block")
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[0].set_ylabel("query position")
    fig.suptitle(title or f"sequence {batch}, KV group {group}")
    fig.tight_layout()
    return fig


def routing_curves(ax, rows: list[dict], *, label: str, color=None):
    """Draw on `ax` a run's routing along training from its metrics rows (`metrics.jsonl`): the mean of
    `val_needle_selected_groups` over the (MSA layer, KV group) cells (dashed) and the cell that routes
    best at the last evaluation (solid). Returns (last step, its [layers, groups] array), None when
    the run logged no routing (dense, or before the metric existed)."""
    evals = [r for r in rows if r["kind"] == "eval" and r.get("val_needle_selected_groups") is not None]
    if not evals:
        return None
    steps = [r["step"] for r in evals]
    groups = np.array([r["val_needle_selected_groups"] for r in evals], dtype=float)  # [evals, layers, groups]
    layer, group = np.unravel_index(groups[-1].argmax(), groups[-1].shape)
    ax.plot(steps, groups.mean(axis=(1, 2)), "o--", color=color, label=f"{label}: mean")
    ax.plot(steps, groups[:, layer, group], "o-", color=color,
            label=f"{label}: layer {layer + 1} group {group} (best at the end)")
    return steps[-1], groups[-1]


def routing_figure(runs: dict[str, tuple[list[dict], str]], path: pathlib.Path, *, grid: str,
                   chance: float | dict[str, float] | None, x_label: str = "step", window: int = 50) -> bool:
    """A task-mix study's routing along training, three panels, from each run's metrics rows
    (`{label: (rows, colour)}`): (left) `routing_curves` of every MSA run, with a uniform choice's rate
    (`chance`, e.g. the runs' `val_needle_selected_chance`; a `{label: rate}` dict draws one line per run in
    its colour, for runs whose forced blocks differ); (middle) `routing_grid` of run `grid` at its
    last evaluation; (right) the training rows' whole answers right, means over `window` steps (dense runs
    too). Writes `path`; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_l, ax_m, ax_r) = plt.subplots(1, 3, figsize=(17, 4.2), gridspec_kw=dict(width_ratios=[1.2, 1, 1.2]))
    last = {}
    for label, (rows, color) in runs.items():
        end = routing_curves(ax_l, rows, label=label, color=color)
        if end is not None:
            last[label] = end
        train = [r for r in rows if r["kind"] == "train" and r.get("answer_exact") is not None]
        ends = range(window - 1, len(train), window)
        ax_r.plot([train[i]["step"] for i in ends], [np.mean([r["answer_exact"] for r in train[i - window + 1:i + 1]])
                                                     for i in ends], "o-", color=color, ms=3, label=label)
    if isinstance(chance, dict):
        for label, rate in chance.items():
            ax_l.axhline(rate, color=runs[label][1], lw=1, ls=":", label=f"uniform choice, {label} ({rate:.2f})")
    elif chance is not None:
        ax_l.axhline(chance, color="grey", lw=1, ls=":", label=f"uniform choice ({chance:.2f})")
    ax_l.set(xlabel=x_label, ylabel="answer rows whose index selects the needle", ylim=(0, 1.02),
             title="routing during training (the probe's rows)")
    ax_l.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.01, 0.9))
    step, g = last[grid]
    fig.colorbar(routing_grid(ax_m, g, title=f"needle selected, step {step}: {grid}"), ax=ax_m, fraction=0.05)
    ax_r.set(xlabel=x_label, ylabel=f"training rows' answers exact ({window}-step means)", ylim=(-0.02, 1.02),
             title="retrieval while training")
    ax_r.legend(fontsize=6.5, loc="upper left")
    for ax in (ax_l, ax_r):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def routing_grid(ax, groups, *, title: str = ""):
    """Draw a training evaluation's `val_needle_selected_groups` ([MSA layers, KV groups] shares of the
    probe's answer rows whose index selects the needle's block) on `ax` as an annotated heatmap, MSA
    layers numbered from 1; returns the image (for a colorbar)."""
    g = np.asarray(groups, dtype=float)
    im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(g):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
    ax.set(xticks=range(g.shape[1]), yticks=range(g.shape[0]), yticklabels=[str(i + 1) for i in range(g.shape[0])],
           xlabel="KV group", ylabel="MSA layer", title=title)
    return im


def needle_selection_figure(block_idx: list, *, layers: list[int], block_size: int, needle: tuple[int, int],
                            answer: tuple[int, int], title: str = "", detail_layer: int | None = None):
    """What the index branch selected on one retrieval example, against where the needle is.

    block_idx: per MSA layer, int [T, H_kv, top_k] (`model.layer_selections` of one sequence);
    layers: their layer numbers; needle, answer: [start, end) token ranges of the queried needle
    and of the query rows that predict the answer. Left: per layer, the share of the answer's query
    rows x KV groups that select each KV block (the needle's blocks outlined: 1.0 there means every
    answer query can read the needle). Right: one layer's selection for every query row (group 0),
    the needle's blocks and the answer rows marked. (`selection_figure` needs the dense attention
    mass, O(T^2): too big at the lengths this is for.) Returns the figure (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    ids = [np.asarray(b) for b in block_idx]
    T = ids[0].shape[0]
    n_blocks = -(-T // block_size)
    a0, a1 = answer
    share = np.zeros((len(ids), n_blocks))
    for li, b in enumerate(ids):
        sel = b[a0:a1].reshape(-1, b.shape[-1])  # (answer row, group) x top_k
        for row in sel:
            share[li, row[row >= 0]] += 1
        share[li] /= sel.shape[0]
    nb0, nb1 = needle[0] // block_size, (needle[1] - 1) // block_size
    detail = len(ids) - 1 if detail_layer is None else layers.index(detail_layer)
    chosen = np.zeros((T, n_blocks))
    d = ids[detail][:, 0]
    r, c = np.nonzero(d >= 0)
    chosen[r, d[r, c]] = 1.0
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.6 + 0.45 * max(len(ids), 6)),
                             gridspec_kw=dict(width_ratios=[1.3, 1]))
    ax = axes[0]
    im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.add_patch(plt.Rectangle((nb0 - 0.5, -0.5), nb1 - nb0 + 1, len(ids), fill=False, ec="red", lw=1.5))
    ax.set_yticks(range(len(ids)), [f"layer {i}" for i in layers])
    ax.set(xlabel=f"KV block ({block_size} tokens); red: the needle's block", title="share of the answer's queries "
           "(x groups) selecting each block")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax = axes[1]
    ax.imshow(chosen, aspect="auto", interpolation="nearest", cmap="Greys")
    ax.axvspan(nb0 - 0.5, nb1 + 0.5, color="red", alpha=0.25, lw=0)
    ax.axhspan(a0 - 0.5, a1 - 0.5, color="tab:blue", alpha=0.3, lw=0)
    ax.set(xlabel="KV block (red: needle)", ylabel="query position (blue: answer rows)",
           title=f"layer {layers[detail]}, group 0: selected blocks per query")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def selection_distance_figure(rates: dict, *, block_size: int, train_len: int, title: str = ""):
    """Selection rate against query-key distance, one panel per layer: `rates` maps a layer number to
    {curve label: rate per distance in blocks} (`retrieval.selection_by_distance`'s picks / visible,
    summed over examples; None where nothing could be that far). A dashed line marks the training
    length: right of it are distances the model never trained on. A choice blind to distance is flat;
    peaks at a few far distances are a score that depends on the distance alone. Returns the figure
    (None without matplotlib)."""
    plt = pyplot()
    if plt is None or not rates:
        return None
    n = len(rates)
    cols = min(n, 4)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False, sharey=True)
    for ax, (layer, curves) in zip(axes.flat, rates.items()):
        for i, (label, rate) in enumerate(curves.items()):
            r = np.array([np.nan if x is None else x for x in rate], float)
            ax.plot(np.arange(len(r)) * block_size, r, lw=0.9, color=f"C{i}", label=label, alpha=0.85)
        ax.axvline(train_len, color="gray", ls="--", lw=0.8)
        ax.set(yscale="log", title=f"layer {layer}", xlabel="distance back (tokens)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("selection rate")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def speedup_curves(results: dict) -> dict[str, list[tuple]]:
    """The speedup series of a committed benchmark result (the results.json of bench_prefill,
    bench_train or bench_decode): {label: [(length, speedup), ...]}, bounds included ("... bound")."""
    curves: dict[str, list[tuple]] = {}
    add = lambda label, x, y: curves.setdefault(label, []).append((x, y))  # noqa: E731
    if "rows" in results:  # bench_prefill
        for r in results["rows"]:
            add("MSA prefill (Pallas)", r["T"], r["main_indexer"]["speedup"])
            add("FLOP bound", r["T"], r["flop_bound"])
    elif "attention" in results and results["attention"] and "impls" in results["attention"][0]:  # bench_train
        for r in results["attention"]:
            for impl, m in r["impls"].items():
                if "speedup" in m.get("total", {}):
                    add(f"MSA training attention ({impl})", r["T"], m["total"]["speedup"])
    else:  # bench_decode: per batch size, against the fastest dense decode
        for r in results.get("attention", []):
            dense = r[r["fastest_dense"]]["ms"]
            for key, name in (("msa_bf16", "bf16"), ("msa_fp8", "fp8")):
                if r.get(key, {}).get("status") == "ok":
                    add(f"MSA decode {name}, batch {r['B']}", r["L"], dense / r[key]["ms"])
            add(f"byte bound bf16, batch {r['B']}", r["L"], r["byte_floor_speedup"]["bf16"])
    return curves


def speedup_figure(curves: dict[str, list[tuple]], *, title: str, xlabel: str = "context length T"):
    """Speedups over dense against length on log-log axes; series whose label contains "bound" are
    dashed. Returns the figure (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in curves.items():
        x, y = zip(*sorted(pts))
        ax.plot(x, y, "--" if "bound" in label else "o-", label=label, lw=1.2 if "bound" in label else 1.8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel="speedup over dense", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
