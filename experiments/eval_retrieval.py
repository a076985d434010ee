"""Long-context quality of trained runs: retrieval exact match (RULER-style passkey / multi-key /
variable tracking) with 95% confidence intervals, validation bits/byte, and the index branch's recall.

Loads the latest (or `--step`) checkpoint of each training run directory (`train_lm.py`), dense or
MSA, builds haystacks from the validation packages of the run's own corpus (code it never trained
on), and reports greedy exact match by task, context length and needle depth
(`msa_jax.retrieval`), each cell with its 95% Wilson interval: teacher-forced (`--mode
teacher-forced`, one forward pass; each answer byte predicted from the true earlier ones) or
free-running (`--mode generate`: the model writes the whole answer itself from the KV + index-key
caches, `msa_jax.generate`). An MSA model is evaluated with top-k routing on. Default lengths: from
4096 (or the training length, if shorter), doubling, up to 2x the training length. For each run it
also measures, at the training length, the validation loss in bits/byte (`--val-batches` windows of
unseen packages, as the training loop's evaluation does) and, for MSA, the block / score recall of
every MSA layer and, on the last 256 rows of each validation window's first sequence, how often each
layer's index and its own dense attention's top-k pick the block d back (`selection_by_distance`,
per layer {index, attention's top-k}: a position-blind index picks the near blocks less); and traces
passkey examples at the training length (or `--selection-lengths`) at one or more needle depths
(`--selection-depths`): where each layer's dense attention and (MSA) index branch put the answer's
rows against where the needle is, with a picture of the first example's selection per length and
depth. Past the training length the trace also gives, per layer, the share
of the answer's dense attention mass and of its top-k blocks at distances the model never trained on
(`attention_mass_beyond`, `attention_top_k_beyond`), and per MSA layer the share of the index's
selected blocks there (`selected_beyond`), beside a uniform choice's (`beyond_uniform`). It also
draws the selection rate against distance per layer (`selection_rate_by_distance`,
distance_<run>_T<len>_depth<d>.png): the attention's top-k and the index's picks at the answer's
rows, and the index's picks over every row past the training length.

Output (under --out, default runs/retrieval):
  results.json          every (run, task, length, depth) cell (accuracy, correct, n, ci_low, ci_high,
                        byte_accuracy, and each example's outcome with a hash of the examples, which
                        experiments/compare_retrieval.py uses to compare two runs paired), each run's
                        validation metrics, per-layer recall and needle traces (val[...]["selections"],
                        one per traced length and depth), and the runs' configs; written after each
                        phase too, with "partial" naming what is missing, so a stopped evaluation
                        keeps the cells it finished
  results.md            the same as Markdown tables (exact match [95% CI] per depth, all depths pooled)
  heatmap_<run>.png     exact match, depth x length, one panel per task
  selection_<run>_depth<d>.png   MSA runs: the index branch's selection on one passkey example vs
                        the needle, per traced depth (selection_<run>_T<len>_depth<d>.png for a
                        traced length other than the training length)
  distance_<run>_T<len>_depth<d>.png   traced lengths past the training length: selection rate against
                        query-key distance per layer (attention's top-k, index)
  by_length.png         exact match over all depths against context length, per task (2+ lengths)
  retrieval.png         all runs' heatmaps on one figure; retrieval_bytes.png: the share of answer
                        bytes right (partial credit)

  python experiments/eval_retrieval.py runs/tiny_dense runs/tiny_msa --n 8
  python experiments/eval_retrieval.py runs/lc_dense runs/lc_msa runs/lc_cpt --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from msa_jax import plots, retrieval
from msa_jax.presets import HelpFormatter

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"
UNION_TILES = (4, 8, 16, 32)  # query-outer tile sizes (tokens) whose block union the evaluation reports


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories of experiments/train_lm.py")
    p.add_argument("--tasks", default=",".join(retrieval.TASKS), help="comma list of " + ", ".join(retrieval.TASKS))
    p.add_argument("--lengths", default=None,
                   help="comma list of context lengths (default: each run's 4096 or training length, doubling, "
                        "up to 2x its training length)")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help="comma list of needle depths in [0, 1]")
    p.add_argument("--n", type=int, default=50,
                   help="examples per (task, length, depth); 50 gives a 95%% interval of about +-0.14 at 0.5 and "
                        "[0, 0.07] at 0 (use e.g. --n 8 for a quick look on the CPU)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per forward pass")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: each run's latest)")
    p.add_argument("--impl", default=None, help="override the ops backend the runs were trained with")
    p.add_argument("--top-k", type=int, default=None,
                   help="MSA runs: select this many blocks per query and group instead of the trained top_k (an "
                        "inference-time ablation; no weight changes). The run's label gets -top<k>")
    p.add_argument("--sink-blocks", type=int, default=None,
                   help="MSA runs: always select the context's first N blocks, counted in top_k (inference-time "
                        "ablation, e.g. 1: is a needle in the first block missed only by the index?). Label: -sink<N>")
    p.add_argument("--local-blocks", type=int, default=None,
                   help="MSA runs: always-selected blocks ending at the query's own (inference-time ablation). "
                        "Label: -local<N>")
    p.add_argument("--mode", choices=("teacher-forced", "generate"), default="teacher-forced",
                   help="score teacher-forced next-byte predictions, or answers the model generates itself")
    p.add_argument("--index-cache-dtype", default=None, help="--mode generate: bfloat16, float32 or float8_e4m3fn")
    p.add_argument("--val-batches", type=int, default=None,
                   help="validation batches for bits/byte and per-layer recall at the training length (default: "
                        "the run's --eval-batches; 0: skip)")
    p.add_argument("--selection-depths", "--selection-depth", default="0.5",
                   help="comma list of needle depths of the passkey examples where the attention and (MSA) the "
                        "index branch's selection are traced to the needle; each depth's first example is drawn")
    p.add_argument("--selection-lengths", default=None,
                   help="comma list of context lengths for the needle trace (default: each run's training length; "
                        "a longer one shows where the index selects past the distances it trained on)")
    p.add_argument("--selection-examples", type=int, default=8,
                   help="passkey examples at the training length for that trace (per layer: the dense attention's "
                        "mass on the needle's block at the answer's rows, whether the block is in its top-k, and "
                        "(MSA) whether the index branch selected it)")
    p.add_argument("--no-selection", dest="selection", action="store_false",
                   help="skip the needle trace and the selection picture")
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
    try:
        retrieval.check_tasks(tasks, name="--tasks")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    depths = _floats(args.depths, "depths")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise SystemExit(f"--depths: expected numbers in [0, 1], got {args.depths!r}")
    lengths = None if args.lengths is None else [int(x) for x in _floats(args.lengths, "lengths")]
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("--n and --batch-size: expected ints >= 1")
    if args.val_batches is not None and args.val_batches < 0:
        raise SystemExit(f"--val-batches: expected an int >= 0, got {args.val_batches}")
    if args.selection_examples < 1:
        raise SystemExit(f"--selection-examples: expected an int >= 1, got {args.selection_examples}")
    trace_depths = _floats(args.selection_depths, "selection-depths")
    if not trace_depths or not all(0.0 <= d <= 1.0 for d in trace_depths):
        raise SystemExit(f"--selection-depths: expected numbers in [0, 1], got {args.selection_depths!r}")
    trace_lengths = None
    if args.selection_lengths is not None:
        got = _floats(args.selection_lengths, "selection-lengths")
        if not got or not all(x == int(x) and x >= retrieval.min_context_len("passkey") for x in got):
            raise SystemExit(f"--selection-lengths: expected ints >= {retrieval.min_context_len('passkey')} "
                             f"(a passkey example's shortest context), got {args.selection_lengths!r}")
        trace_lengths = [int(x) for x in got]

    # inference-time routing of the MSA runs (checkpoint.ROUTING_FIELDS), and the label suffix that says so
    routing = {k: v for k, v in dict(top_k=args.top_k, sink_blocks=args.sink_blocks,
                                     local_blocks=args.local_blocks).items() if v is not None}
    suffix = "".join(f"-{dict(top_k='top', sink_blocks='sink', local_blocks='local')[k]}{v}" for k, v in routing.items())

    import jax
    import numpy as np
    from flax import nnx
    from tqdm.auto import tqdm

    from msa_jax import bench, data, loop, sharding
    from msa_jax.checkpoint import load_run
    from msa_jax.generate import generate
    from msa_jax.model import layer_selections
    from msa_jax.needle_trace import INDEX, TOP_K, needle_trace, selection_by_distance_on

    @nnx.jit
    def forward(model, tokens):
        return model(tokens, sparse=True)[0]  # sparse: top-k routing for MSA (ignored by dense)

    selections = nnx.jit(layer_selections, static_argnames="with_recall")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rows, val_rows, partial=None) -> dict:
        """Write results.json and results.md. Also called after each phase with `partial` saying what is
        missing, so that an evaluation stopped midway (a GPU call's deadline) keeps the cells it finished."""
        md = plots.retrieval_markdown(rows, depths)
        results = dict(rows=rows, val=val_rows, runs=configs, tasks=tasks, depths=depths, n=args.n, seed=args.seed,
                       mode=args.mode, jax=jax.__version__, device=jax.devices()[0].device_kind,
                       table=plots.retrieval_table(rows, depths),
                       byte_table=plots.retrieval_table(rows, depths, "byte_accuracy"), markdown=md)
        if partial:
            results["partial"] = partial
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text((f"**Partial**: {partial} (the evaluation stopped).\n\n" if partial else "")
                                        + f"Exact match ({args.mode} greedy), {args.n} examples per cell, "
                                        f"[95% Wilson interval]:\n\n{md}\n\n{_val_markdown(val_rows)}\n")
        return results
    one_device = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    rows, configs, names, val_rows = [], {}, [], []
    labels = plots.run_labels(args.runs)
    for run, name in zip(map(pathlib.Path, args.runs), labels):
        try:
            model, cfg, step = load_run(run, args.step, impl=args.impl, routing=routing)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        except ValueError as e:  # e.g. --local-blocks above top_k
            raise SystemExit(f"{run}: {e}") from None
        msa_routing = routing if cfg.attention == "msa" else {}  # a dense run has nothing to route
        name = name + suffix if msa_routing else name
        names.append(name)
        is_msa = cfg.attention == "msa"
        msa_layers = [i for i in range(cfg.n_layers) if cfg.model_config().is_msa_layer(i)]
        configs[name] = dict(config=cfg.to_dict(), step=step, **({"routing_override": msa_routing} if msa_routing else {}))
        corpus = data.load_corpus(cfg.max_bytes, sources=tuple(cfg.sources.split(",")))
        Ts = lengths or retrieval.default_lengths(cfg.seq_len)
        print(f"{name}: {cfg.attention} model at step {step} (trained at T={cfg.seq_len}); haystacks from "
              f"{len(corpus.val_packages)} val packages ({corpus.val.size / 1e6:.2f} MB); lengths {Ts}")
        t0 = time.perf_counter()
        logits_fn = lambda t: forward(model, jax.numpy.asarray(t))  # noqa: E731
        generate_fn = lambda prompts, n: generate(  # noqa: E731
            model, prompts, max_new_tokens=n, index_cache_dtype=args.index_cache_dtype, stream_every=n).tokens
        with tqdm(total=len(tasks) * len(Ts) * len(depths), desc=f"{name} retrieval", unit="cell",
                  dynamic_ncols=True, file=sys.stdout) as bar:
            for r in retrieval.evaluate(logits_fn, corpus.val, tasks, Ts, depths, args.n, args.seed,
                                        batch_size=args.batch_size, on_row=lambda r: bar.update(),
                                        generate_fn=generate_fn if args.mode == "generate" else None):
                rows.append(dict(run=name, attention=cfg.attention, step=step, **r))
        phases = dict(retrieval=time.perf_counter() - t0)  # seconds per phase, compilation included
        val = dict(run=name, attention=cfg.attention, step=step, seq_len=cfg.seq_len)
        save(rows, val_rows + [val], partial=f"{name}: validation and needle traces not done")

        n_val = cfg.eval_batches if args.val_batches is None else args.val_batches
        if n_val:
            # the training loop's own evaluation, at the training length, on windows of unseen packages
            eval_set = data.eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, n_val)
            val.update(loop.evaluate(model, eval_set, one_device, is_msa=is_msa, sparse=True), val_windows=n_val)
            if is_msa:
                # union: the distinct blocks a query-outer kernel tile (128 rows: 128 // G_pad tokens x
                # the group's heads) would read, against top_k per token (docs/algorithm.md §7)
                g = cfg.n_heads // cfg.n_kv_heads
                tile = max(1, 128 // (1 << (g - 1).bit_length()))
                # also at other tile sizes: a tile of 16 heads per group holds 4 (64 rows) or 8 tokens
                tiles = sorted({tile, *UNION_TILES})
                per = [[(float(s["block_recall"]), float(s["score_recall"]),
                         *(bench.selection_union(s["block_idx"], t) for t in tiles))
                        for s in selections(model, jax.numpy.asarray(b[:, :-1]), with_recall=True) if s is not None]
                       for b in eval_set]
                mean = np.mean(np.array(per), axis=0)  # [layer, (block, score, union per tile size)]
                col = 2 + tiles.index(tile)
                val["per_layer"] = [dict(layer=i, block_recall=float(m[0]), score_recall=float(m[1]),
                                         block_union=float(m[col]), union_tile_tokens=tile,
                                         union_by_tile={str(t): float(u) for t, u in zip(tiles, m[2:])})
                                    for i, m in zip(msa_layers, mean)]
                print(f"  distinct blocks selected by {tile} consecutive tokens (top_k {cfg.top_k} each), per MSA "
                      f"layer: {', '.join(f'{u:.1f}' for u in mean[:, col])}; mean over layers by tile tokens: "
                      + ", ".join(f"{t}: {u:.1f}" for t, u in zip(tiles, mean[:, 2:].mean(0))))
                by_d = val["selection_by_distance"] = selection_by_distance_on(
                    model, cfg, np.stack([b[0, :-1] for b in eval_set]))
                near = lambda c: np.array([r[c][1:4] for r in by_d.values()], float).mean(0)  # noqa: E731
                print("  the blocks 1 / 2 / 3 back chosen (mean over MSA layers): index "
                      + " / ".join(f"{v:.2f}" for v in near(INDEX)) + f", its attention's top {cfg.top_k} "
                      + " / ".join(f"{v:.2f}" for v in near(TOP_K)))
        phases["validation and recall"] = time.perf_counter() - t0 - sum(phases.values())
        traced = trace_lengths or ([cfg.seq_len] if cfg.seq_len >= retrieval.min_context_len("passkey") else [])
        if args.selection and traced:
            save(rows, val_rows + [val], partial=f"{name}: needle traces not done")
            # Pass-key examples at the training length (or the lengths asked for): where the dense attention
            # of the answer's rows goes (the teacher an index branch learns from), and (MSA) whether the
            # index selected it; past the training length, how much of its selection lies at distances it
            # never trained on.
            val["selections"] = [needle_trace(model, cfg, corpus.val, T, d, examples=args.selection_examples,
                                              seed=args.seed, name=name, figure_dir=out)
                                 for T in traced for d in trace_depths]
        val_rows.append(val)
        phases["needle traces"] = time.perf_counter() - t0 - sum(phases.values())
        print(f"  {sum(phases.values()):.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()) + ")")

    results = save(rows, val_rows)
    print(f"\nexact match ({args.mode} greedy), {args.n} examples per cell:\n{results['table']}")
    print(f"\nshare of answer bytes right (chance ~0.1 per digit):\n{results['byte_table']}")
    print(f"\n{_val_markdown(val_rows)}")
    plotted = plots.plot_retrieval(rows, names, tasks, out / "retrieval.png")
    plots.plot_retrieval(rows, names, tasks, out / "retrieval_bytes.png", "byte_accuracy")
    for name in names:
        plots.plot_retrieval(rows, [name], tasks, out / f"heatmap_{name}.png")
    train_lens = {v["seq_len"] for v in val_rows}  # a dashed line at the training length when the runs share one
    plots.retrieval_by_length(rows, names, tasks, out / "by_length.png",
                              train_len=train_lens.pop() if len(train_lens) == 1 else None)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f" and the figures (heatmap_<run>.png, selection_<run>_depth<d>.png, retrieval.png) in {out}"
             if plotted else ""))
    return results


def _val_markdown(val_rows: list[dict]) -> str:
    """Validation at the training length: bits/byte, mean and per-layer recall (MSA); then the needle
    trace per layer (the dense attention at the answer's rows, the index branch's selection)."""
    lines = ["| run | attention | step | T | val bits/byte | block recall | score recall | block recall per layer |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    per_layer = lambda d: " ".join(f"{k}:{x:.2f}" for k, x in d.items()) or "–"  # noqa: E731
    for v in val_rows:
        per = " ".join(f"{p['layer']}:{p['block_recall']:.2f}" for p in v.get("per_layer", [])) or "–"
        lines.append(f"| {v['run']} | {v['attention']} | {v['step']} | {v['seq_len']} | {f(v.get('val_bpb'))} | "
                     f"{f(v.get('block_recall'))} | {f(v.get('score_recall'))} | {per} |")
    traced = [v for v in val_rows if v.get("selections")]
    if traced:
        sel = traced[0]["selections"][0]
        far = any("attention_top_k_beyond" in s for v in traced for s in v["selections"])
        lines += ["", f"The needle, per layer, at the answer's rows of {sel['examples']} pass-key examples per context "
                  "length and needle depth: the dense attention's mass on the needle's block, the share "
                  "of (row, group) whose top-k blocks by that mass include it (what the index branch is taught), "
                  "and the share whose index selection includes it (MSA)"
                  + ("; past the training length, on blocks lying wholly at distances the model never trained on: "
                     "the share of the dense attention's mass and of its top-k blocks there, and the share of "
                     "the index's selected blocks there (in brackets: a uniform choice's share)." if far else "."),
                  "", "| run | T | depth | answers right | attention mass on the needle | needle in the attention's top-k | "
                  "needle selected by the index |" + (" attention mass past the training distance | attention's "
                                                      "top-k past it | selected past it [uniform] |" if far else ""),
                  "|---|---|---|---|---|---|---|" + ("---|---|---|" if far else "")]
        for v in traced:
            for s in v["selections"]:
                beyond = ""
                if far and "attention_top_k_beyond" in s:
                    beyond = (f" {per_layer(s['attention_mass_beyond'])} | {per_layer(s['attention_top_k_beyond'])} | "
                              f"{per_layer(s.get('selected_beyond', {}))} [{s['beyond_uniform']:.2f}] |")
                elif far:
                    beyond = " – | – | – |"
                lines.append(f"| {v['run']} | {s.get('context_len', v['seq_len'])} | {s['depth']:g} | {s['correct']:.2f} | "
                             f"{per_layer(s['teacher_needle_mass'])} | {per_layer(s['teacher_needle_in_top_k'])} | "
                             f"{per_layer(s.get('needle_selected', {}))} |" + beyond)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
