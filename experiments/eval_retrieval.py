"""Long-context retrieval accuracy (RULER-style passkey / multi-key / variable tracking) of trained runs.

Loads the latest (or `--step`) checkpoint of each training run directory (`train_lm.py`), dense or
MSA, builds haystacks from the validation packages of the run's own corpus (code it never trained
on), and reports greedy exact match by task, context length and needle depth
(`msa_jax.retrieval`): teacher-forced (`--mode teacher-forced`, one forward pass; each answer byte
predicted from the true earlier ones) or free-running (`--mode generate`: the model writes the
whole answer itself from the KV + index-key caches, `msa_jax.generate`). An MSA model is
evaluated with top-k routing on.

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
import time

from msa_jax import plots, retrieval

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
    p.add_argument("--mode", choices=("teacher-forced", "generate"), default="teacher-forced",
                   help="score teacher-forced next-byte predictions, or answers the model generates itself")
    p.add_argument("--index-cache-dtype", default=None, help="--mode generate: bfloat16, float32 or float8_e4m3fn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/retrieval")
    return p


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}: expected a comma list of numbers, got {text!r}") from None


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
    from msa_jax.checkpoint import load_run
    from msa_jax.generate import generate

    @nnx.jit
    def forward(model, tokens):
        return model(tokens, sparse=True)[0]  # sparse: top-k routing for MSA (ignored by dense)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, configs, names = [], {}, []
    for run in map(pathlib.Path, args.runs):
        try:
            model, cfg, step = load_run(run, args.step, impl=args.impl)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        name = run.name
        names.append(name)
        configs[name] = dict(config=cfg.to_dict(), step=step)
        corpus = data.load_corpus(cfg.max_bytes, sources=tuple(cfg.sources.split(",")))
        Ts = lengths or [cfg.seq_len]
        print(f"{name}: {cfg.attention} model at step {step}; haystacks from {len(corpus.val_packages)} val "
              f"packages ({corpus.val.size / 1e6:.2f} MB); lengths {Ts}")
        t0 = time.perf_counter()
        logits_fn = lambda t: forward(model, jax.numpy.asarray(t))  # noqa: E731
        generate_fn = lambda prompts, n: generate(  # noqa: E731
            model, prompts, max_new_tokens=n, index_cache_dtype=args.index_cache_dtype, stream_every=n).tokens
        for r in retrieval.evaluate(logits_fn, corpus.val, tasks, Ts, depths, args.n, args.seed,
                                    batch_size=args.batch_size,
                                    generate_fn=generate_fn if args.mode == "generate" else None):
            rows.append(dict(run=name, attention=cfg.attention, step=step, **r))
        print(f"  {time.perf_counter() - t0:.0f}s")
    table = plots.retrieval_table(rows, depths)
    byte_table = plots.retrieval_table(rows, depths, "byte_accuracy")
    print(f"\nexact match ({args.mode} greedy), {args.n} examples per cell:\n{table}")
    print(f"\nshare of answer bytes right (chance ~0.1 per digit):\n{byte_table}")
    results = dict(rows=rows, runs=configs, tasks=tasks, depths=depths, n=args.n, seed=args.seed, mode=args.mode,
                   jax=jax.__version__, device=jax.devices()[0].device_kind, table=table, byte_table=byte_table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plotted = plots.plot_retrieval(rows, names, tasks, out / "retrieval.png")
    plots.plot_retrieval(rows, names, tasks, out / "retrieval_bytes.png", "byte_accuracy")
    print(f"wrote {out / 'results.json'}" + (f", {out / 'retrieval.png'} and {out / 'retrieval_bytes.png'}" if plotted else ""))
    return results


if __name__ == "__main__":
    main()
