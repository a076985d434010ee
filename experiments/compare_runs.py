"""Compare train_lm.py runs: a loss / recall table (Markdown) and curves on one figure.

A run converted from a dense checkpoint (`--init-from`) is drawn from the dense step it started
at, so dense, MSA-from-scratch and MSA-converted runs line up on one "total steps" axis.

  python experiments/compare_runs.py runs/tiny_dense runs/tiny_msa runs/tiny_cpt --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

LN2 = math.log(2.0)


def load(run_dir: pathlib.Path) -> dict:
    for name in ("config.json", "metrics.jsonl"):
        if not (run_dir / name).exists():
            raise SystemExit(f"{run_dir}: no {name} (is it a train_lm.py run directory?)")
    cfg = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    offset = int(cfg.get("init_loaded_step") or 0)
    return dict(name=run_dir.name, cfg=cfg, rows=rows, summary=summary, offset=offset)


def summarize(run: dict) -> dict:
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
        train_loss=float(np.mean([r["loss"] for r in tail])) if tail else None,
        val_loss=last.get("val_loss"),
        val_bpb=last.get("val_bpb"),
        block_recall=last.get("block_recall"),
        score_recall=last.get("score_recall"),
        tokens_per_s=float(np.median(tps)) if tps else None,
        wall_s=run["summary"].get("wall_s"),
    )


def markdown(table: list[dict]) -> str:
    def f(x, fmt):
        return "–" if x is None else format(x, fmt)

    lines = ["| run | attention | init | steps (total) | train loss | val loss | val bits/byte | block recall | "
             "score recall | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['run']} | {r['attention']} | {r['init']} | {r['steps']} ({r['total_steps']}) | "
                     f"{f(r['train_loss'], '.3f')} | {f(r['val_loss'], '.3f')} | {f(r['val_bpb'], '.3f')} | "
                     f"{f(r['block_recall'], '.3f')} | {f(r['score_recall'], '.3f')} | {f(r['tokens_per_s'], ',.0f')} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: pathlib.Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            axes[0, 0].plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), color=color, lw=1,
                            alpha=0.6, label=f"{run['name']} train")
        if evals:
            axes[0, 0].plot([r["step"] + run["offset"] for r in evals], [r["val_bpb"] for r in evals], "o-",
                            color=color, label=f"{run['name']} val")
        if has_msa and run["cfg"]["attention"] == "msa" and evals:
            x = [r["step"] + run["offset"] for r in evals]
            axes[0, 1].plot(x, [r["block_recall"] for r in evals], "o-", color=color, label=f"{run['name']} block")
            axes[0, 1].plot(x, [r["score_recall"] for r in evals], "s--", color=color, label=f"{run['name']} score")
        if run["offset"]:
            axes[0, 0].axvline(run["offset"], color=color, ls=":", lw=1)
    axes[0, 0].set(xlabel="total steps (a converted run starts at its dense step)", ylabel="LM loss (bits/byte)",
                   title=title)
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="train_lm.py run directories")
    p.add_argument("--out", default="runs/compare", help="writes compare.png and compare.json here")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    runs = [load(pathlib.Path(r)) for r in args.runs]
    table = [summarize(r) for r in runs]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(table)
    print(md)
    c = runs[0]["cfg"]
    title = args.title or f"T={c['seq_len']}, batch {c['batch_size']} ({c['preset']})"
    plotted = plot(runs, out / "compare.png", title)
    (out / "compare.json").write_text(json.dumps(dict(table=table, markdown=md), indent=1))
    print(f"wrote {out / 'compare.json'}" + (f" and {out / 'compare.png'}" if plotted else ""), file=sys.stderr)
    return dict(table=table, markdown=md)


if __name__ == "__main__":
    main()
