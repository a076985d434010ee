"""Long-context retrieval accuracy (RULER-style passkey / multi-key / variable tracking) of trained runs.

Loads the latest (or `--step`) checkpoint of each run directory written by `train_lm.py`, dense or
MSA, builds haystacks from the validation packages of the run's own corpus (code it never trained
on), and reports teacher-forced greedy exact match by task, context length and needle depth
(`msa_jax.retrieval`). An MSA model is evaluated with top-k routing on.

Output (under --out, default runs/retrieval):
  results.json   every (run, task, context_len, depth) accuracy, plus the runs' configs
  retrieval.png  heatmaps of exact match: one row per run, one column per task, depth x length
  retrieval_bytes.png  the same for the share of answer bytes right (partial credit)

  python experiments/eval_retrieval.py runs/tiny_dense runs/tiny_msa
  python experiments/eval_retrieval.py runs/gpu_msa --lengths 8192,16384 --n 32 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

try:
    import msa_jax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
else:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from msa_jax import retrieval

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories of experiments/train_lm.py")
    p.add_argument("--tasks", default=",".join(retrieval.TASKS), help="comma list of " + ", ".join(retrieval.TASKS))
    p.add_argument("--lengths", default=None, help="comma list of context lengths (default: each run's seq_len)")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help="comma list of needle depths in [0, 1]")
    p.add_argument("--n", type=int, default=8, help="examples per (task, length, depth)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per forward pass")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: each run's latest)")
    p.add_argument("--impl", default=None, help="override the ops backend the runs were trained with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/retrieval")
    return p


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}: expected a comma list of numbers, got {text!r}") from None


def load_run(run_dir: pathlib.Path, step: int | None, impl: str | None):
    """(model with restored weights, config dict, step) of a train_lm.py run directory."""
    import absl.logging

    from msa_jax.checkpoint import Checkpointer
    from train_lm import checkpoint_dir, model_from_config

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax warns that a read-only manager is read-only

    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        raise SystemExit(f"{run_dir}: no checkpoints/ directory (is it a train_lm.py run directory?)")
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        step = ckpt.resolve_step(step)
        cfg = dict(ckpt.restore_meta(step)["config"])
        if impl:
            cfg["impl"] = impl
        model = model_from_config(cfg)
        ckpt.restore(model, step=step)
    return model, cfg, step


def format_table(rows: list[dict], depths: list[float], metric: str = "accuracy") -> str:
    head = ["run", "task", "length"] + [f"d={d:g}" for d in depths] + ["mean"]
    table = [head]
    keys = dict.fromkeys((r["run"], r["task"], r["context_len"]) for r in rows)
    for run, task, T in keys:
        accs = [r[metric] for r in rows if (r["run"], r["task"], r["context_len"]) == (run, task, T)]
        table.append([run, task, str(T)] + [f"{a:.2f}" for a in accs] + [f"{sum(accs) / len(accs):.2f}"])
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in table]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def plot(rows: list[dict], runs: list[str], tasks: list[str], path: pathlib.Path, metric: str = "accuracy") -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
                ax.set_ylabel(f"{run}\ncontext length")
            if i == 0:
                ax.set_title(f"{task} ({'exact match' if metric == 'accuracy' else 'answer bytes right'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        retrieval.get_task(t)  # ValueError naming the task
    depths = _floats(args.depths, "depths")
    lengths = None if args.lengths is None else [int(x) for x in _floats(args.lengths, "lengths")]
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("--n and --batch-size: expected ints >= 1")

    import jax
    from flax import nnx

    from msa_jax import data

    @nnx.jit
    def forward(model, tokens):
        return model(tokens, sparse=True)[0]  # sparse: top-k routing for MSA (ignored by dense)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, configs, names = [], {}, []
    for run in map(pathlib.Path, args.runs):
        model, cfg, step = load_run(run, args.step, args.impl)
        name = run.name
        names.append(name)
        configs[name] = dict(config=cfg, step=step)
        corpus = data.load_corpus(cfg["max_bytes"], sources=tuple(cfg["sources"].split(",")))
        Ts = lengths or [cfg["seq_len"]]
        print(f"{name}: {cfg['attention']} model at step {step}; haystacks from {len(corpus.val_packages)} val "
              f"packages ({corpus.val.size / 1e6:.2f} MB); lengths {Ts}")
        t0 = time.perf_counter()
        for r in retrieval.evaluate(lambda t: forward(model, jax.numpy.asarray(t)), corpus.val, tasks, Ts, depths,
                                    args.n, args.seed, batch_size=args.batch_size):
            rows.append(dict(run=name, attention=cfg["attention"], step=step, **r))
        print(f"  {time.perf_counter() - t0:.0f}s")
    table = format_table(rows, depths)
    byte_table = format_table(rows, depths, "byte_accuracy")
    print(f"\nexact match (teacher-forced greedy), {args.n} examples per cell:\n{table}")
    print(f"\nshare of answer bytes right (chance ~0.1 per digit):\n{byte_table}")
    results = dict(rows=rows, runs=configs, tasks=tasks, depths=depths, n=args.n, seed=args.seed,
                   jax=jax.__version__, device=jax.devices()[0].device_kind, table=table, byte_table=byte_table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plotted = plot(rows, names, tasks, out / "retrieval.png")
    plot(rows, names, tasks, out / "retrieval_bytes.png", "byte_accuracy")
    print(f"wrote {out / 'results.json'}" + (f", {out / 'retrieval.png'} and {out / 'retrieval_bytes.png'}" if plotted else ""))
    return results


if __name__ == "__main__":
    main()
