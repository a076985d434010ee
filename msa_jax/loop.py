"""The training loop: `train_and_evaluate(run, run_dir)` trains one model (dense or MSA), resumably.

Run directory:
  config.json     the RunConfig (a resumed run must match it, but for `RunConfig.RESUMABLE` fields)
  metrics.jsonl   one JSON object per line: a "train" row per step (step, loss = LM loss in
                  nats/byte, kl, lr, grad_norm, index_grad_norm, tokens_per_s, sparse, total_loss)
                  and an "eval" row per evaluation (step, sparse, val_loss, val_bpb, val_kl,
                  block_recall, score_recall, eval_s; with a task mix val_answer_bytes,
                  val_answer_exact and, for MSA, val_needle_selected[_layers, _groups]: `evaluate`)
  loss.png        train / val loss, KL and recall curves (redrawn at every eval)
  summary.json    written when the run reaches its last step
  checkpoints/    Orbax checkpoints: params, optimizer, step, data iterator state, seed, config

The MSA recipe (docs/algorithm.md §6): loss = LM + kl_weight * the index KL summed over MSA
layers; `msa_warmup_steps` of dense attention with the KL over the full causal support, then top-k
routing with the KL over the selected blocks; `init_from` starts a model from another run's
weights (fresh optimizer and index projections): an MSA model from a dense run (continued
pre-training), or either kind at a new sequence length (a length curriculum). Evaluations run in the mode in force at
that step (dense during the warmup, sparse after; the row's `sparse` says which), and an MSA model
also reports the recall of its index branch's selection in either mode.

Calling it again with the same run directory resumes from the latest checkpoint that loads intact
(a damaged one is skipped with a warning, `Checkpointer.restore_latest`) with the same data order
and state: on the CPU, or with `deterministic` on a GPU, the losses are bit-identical to an
uninterrupted run's; on a GPU by default they agree to within its reduction noise. Ctrl-C /
SIGTERM finish the current step, save and raise SystemExit(130); `stop_at` stops cleanly at a step.
A non-finite loss or gradient raises NonFiniteError naming the step, the metrics and the parameters
that went bad; no state of that step or later is saved, so the latest checkpoint stays the last
good one (metrics are fetched, and checked, before every save). Multi-host: every process calls it with the
same arguments after `sharding.maybe_initialize_distributed`; process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import signal
import sys
import time
from typing import NamedTuple

import jax
import numpy as np

from msa_jax import bench, data, determinism, plots, retrieval, sharding
from msa_jax.checkpoint import Checkpointer, checkpoint_dir, load_dense_into_msa
from msa_jax.config import MSAConfig, RunConfig
from msa_jax.model import DecoderLM, count_params
from msa_jax.needle_trace import probe_needle_selected
from msa_jax.train import (lr_schedule, make_optimizer, param_names, sharded_eval_step, sharded_train_step,
                           use_sparse)

LN2 = math.log(2.0)


class MetricsLog:
    """Append-only JSONL of metric rows, written by process 0; `truncate(step)` drops rows > step."""

    def __init__(self, path: pathlib.Path, enabled: bool = True):
        self.path, self.enabled = pathlib.Path(path), enabled

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, step: int) -> None:
        """Keep rows up to `step` (a resumed run rewrites what came after its checkpoint)."""
        if self.enabled and self.path.exists():
            kept = [r for r in self.rows() if r["step"] <= step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)

    def write(self, rows: list[dict]) -> None:
        if self.enabled and rows:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
                f.flush()


class NonFiniteError(FloatingPointError):
    """A training step gave a non-finite loss or gradient (the message names the step, metrics, params)."""


def check_finite(step: int, metrics: dict, names: list[str]) -> None:
    """NonFiniteError naming the non-finite metrics of `step` and the parameters whose gradient is not
    all finite (`metrics["grad_finite"]`, in the order of `names`)."""
    bad = [f"{k}={float(v)}" for k, v in metrics.items() if k != "grad_finite" and not math.isfinite(float(v))]
    flags = np.asarray(metrics.get("grad_finite", np.ones(len(names), bool)), bool)
    params = [n for n, ok in zip(names, flags) if not ok]
    if not bad and not params:
        return
    text = f"non-finite values at step {step}: " + (", ".join(bad) if bad else "loss and metrics finite")
    if params:
        shown = ", ".join(params[:6]) + (f", ... ({len(params) - 6} more)" if len(params) > 6 else "")
        text += f"; the gradient of {len(params)} of {len(names)} parameters is not finite: {shown}"
    raise NonFiniteError(text)


class StopFlag:
    """Ctrl-C / SIGTERM set a flag checked between steps; a second Ctrl-C raises at once."""

    def __init__(self):
        self.requested = False
        self.at = None  # time.perf_counter() of the first signal (the stop's duration is reported from it)

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.at = self.at or time.perf_counter()
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint and stopping "
              "(Ctrl-C again to abort at once)", flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def evaluate(model, eval_set, mesh, *, is_msa: bool, sparse: bool, probe: Probe | None = None,
             msa: MSAConfig | None = None) -> dict:
    """Mean validation metrics over the fixed windows, in the given mode (recall for an MSA model).
    probe: retrieval rows (`retrieval_probe`): + the share of their answer bytes and of whole answers
    predicted right (teacher-forced greedy), val_answer_bytes and val_answer_exact; for an MSA model
    (its MSAConfig given, no context axis) also whether its index routes those answers to the needle
    (`needle_trace.probe_needle_selected`, the rows' mean): val_needle_selected (mean over the MSA
    layers and KV groups), val_needle_selected_layers (per MSA layer), val_needle_selected_groups
    (per MSA layer, per KV group: often one group does the retrieving) and val_needle_selected_chance
    (what a selection blind to content would give: `retrieval.uniform_needle_selected`)."""
    totals: dict[str, float] = {}
    for batch in eval_set:
        m = jax.device_get(sharded_eval_step(model, batch, mesh=mesh, sparse=sparse, with_recall=is_msa))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {k: v / len(eval_set) for k, v in totals.items()}
    row = dict(sparse=sparse, val_loss=out["lm_loss"], val_bpb=out["lm_loss"] / LN2,
               val_kl=out.get("kl") if is_msa else None, block_recall=out.get("block_recall"),
               score_recall=out.get("score_recall"))
    if probe:
        counts: dict[str, float] = {}
        routed = is_msa and msa is not None and mesh.shape["context"] == 1
        hits, chance = [], []
        for batch, needles in zip(probe.batches, probe.needles):
            rows = np.ones(batch.shape[0], bool)
            m = jax.device_get(sharded_eval_step(model, batch, mesh=mesh, sparse=sparse, answer_rows=rows))
            for k in ANSWER_COUNTS:
                counts[k] = counts.get(k, 0.0) + float(m[k])
            if routed:
                hits.append(probe_needle_selected(model, batch, needles, msa.block_size, sparse=sparse, mesh=mesh))
                answer = retrieval.answer_targets(batch.shape[1] - 1)  # the query rows predicting the answer
                chance += [retrieval.uniform_needle_selected(tuple(n), answer, msa.block_size, msa.top_k,
                                                             local_blocks=msa.local_blocks,
                                                             sink_blocks=msa.sink_blocks) for n in needles]
        row.update(answer_rates(counts, "val_"))
        if hits:
            groups = np.concatenate(hits, axis=1).mean(axis=1)  # [MSA layers, H_kv]
            row.update(val_needle_selected=float(groups.mean()), val_needle_selected_layers=groups.mean(1).tolist(),
                       val_needle_selected_groups=groups.round(4).tolist(),
                       val_needle_selected_chance=float(np.mean(chance)))
    return row


ANSWER_COUNTS = ("answer_bytes", "answer_bytes_right", "answer_rows", "answer_rows_right")


def answer_rates(counts: dict, prefix: str = "") -> dict:
    """`train.answer_counts` (summed) -> {prefix + answer_bytes: share of answer bytes right, prefix +
    answer_exact: share of answers all right} (None without retrieval rows)."""
    def rate(a, b):
        return counts[a] / counts[b] if counts.get(b) else None

    return {f"{prefix}answer_bytes": rate("answer_bytes_right", "answer_bytes"),
            f"{prefix}answer_exact": rate("answer_rows_right", "answer_rows")}


class Probe(NamedTuple):
    """The training loop's retrieval probe: batches int32 [batch_size, seq_len + 1] of retrieval rows
    and, per batch, where each row's queried needle is, needles int [batch_size, 2] ([start, end))."""
    batches: list[np.ndarray]
    needles: list[np.ndarray]


def retrieval_probe(run: RunConfig, source, batch_size: int, n_batches: int) -> Probe:
    """Fixed validation batches of retrieval rows for the training loop's evaluations (a run with a
    task mix): `n_batches` x `batch_size` rows of the mixed tasks at the training length (uniform
    depths), haystacks from `source` (the validation split), the answer at the end of each row as in
    training, and their needles' positions."""
    exs = retrieval.training_examples(source, n_batches * batch_size, run.seq_len + 1, run.mix_tasks, rng=run.seed + 1)
    rows = np.stack([ex.tokens for ex in exs]).astype(np.int32)
    needles = np.array([(ex.needle_pos, ex.needle_pos + len(ex.needle)) for ex in exs], np.int64)
    return Probe(list(rows.reshape(n_batches, batch_size, -1)), list(needles.reshape(n_batches, batch_size, 2)))


def check_resume(saved: RunConfig, run: RunConfig) -> list[str]:
    """Fields that differ from the saved run; SystemExit for those that break the resume."""
    diffs = [k for k in saved.differences(run) if k != "init_loaded_step"]
    fatal = [k for k in diffs if k not in RunConfig.RESUMABLE]
    if fatal:
        lines = [f"  {k}: checkpoint {getattr(saved, k)!r} vs now {getattr(run, k)!r}" for k in fatal]
        raise SystemExit("cannot resume: the run directory holds a different run:\n" + "\n".join(lines)
                         + "\nuse another run directory (or delete this one) to start over")
    return diffs


def train_and_evaluate(run: RunConfig, run_dir: str | pathlib.Path, *, progress: bool = True) -> dict:
    """Train `run` into `run_dir` (resuming from its latest checkpoint), evaluate, checkpoint.

    Returns a summary dict: {steps, stopped, run_dir} when it stopped early at `run.stop_at`, else
    {steps, wall_s, n_params, final_eval, median_tokens_per_s, run_dir, env}. Raises SystemExit(130)
    after saving a checkpoint when interrupted (Ctrl-C / SIGTERM).
    """
    from tqdm.auto import tqdm

    if run.deterministic:
        determinism.enable()  # before the first device work below
    mcfg, tcfg = run.model_config(), run.train_config()
    is_main = jax.process_index() == 0
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)
    say = print if is_main else (lambda *a, **k: None)

    mesh = sharding.make_mesh(run.mesh or f"data={jax.device_count()}")
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tcfg.batch_size % n_batch_shards:
        raise SystemExit(f"batch_size {tcfg.batch_size} must be a multiple of data*fsdp = {n_batch_shards} "
                         f"(mesh {dict(mesh.shape)})")
    if tcfg.seq_len % (2 * mesh.shape["context"]):
        raise SystemExit(f"seq_len {tcfg.seq_len} must be a multiple of 2 * context = {2 * mesh.shape['context']} "
                         f"(the zigzag split of msa_jax.context; mesh {dict(mesh.shape)})")
    say(f"jax {jax.__version__} | {jax.process_count()} process(es), {jax.device_count()} device(s) "
        f"[{jax.devices()[0].device_kind}] | mesh {dict(mesh.shape)} | python {platform.python_version()}"
        + (" | deterministic" if determinism.is_enabled() else ""))

    corpus = data.load_corpus(run.max_bytes, sources=tuple(run.sources.split(",")))
    say(f"corpus: {corpus.summary()}")
    eval_set = data.eval_batches(corpus.val, tcfg.batch_size, tcfg.seq_len, run.eval_batches)
    probe = retrieval_probe(run, corpus.val, tcfg.batch_size, run.eval_batches) if run.task_mix else None

    model = DecoderLM(mcfg, seed=run.seed)
    optimizer = make_optimizer(model, tcfg)
    sharding.shard_model(model, mesh)
    sharding.shard_optimizer(optimizer, mesh)
    is_msa = mcfg.attention == "msa"

    ckpt = Checkpointer(run_dir / "checkpoints", keep=run.keep)
    start = 0
    if ckpt.all_steps():
        changed: list[str] = []

        def check_meta(meta: dict) -> None:
            nonlocal run, changed
            saved = RunConfig.from_dict(meta["config"])
            run = dataclasses.replace(run, init_loaded_step=saved.init_loaded_step)
            changed = check_resume(saved, run)

        # into the current (sharded) layout; damaged steps are skipped with a warning
        start, meta = ckpt.restore_latest(model, optimizer, check_meta=check_meta)
        batches = data.BatchIterator.from_state(corpus.train, meta["data"])
        log.truncate(start)
        say(f"resumed from {ckpt.directory}/{start} (step {start}/{tcfg.steps})"
            + (f"; changed: {', '.join(changed)}" if changed else ""))
        if "steps" in changed:
            say("  note: the number of steps changed, so the cosine LR schedule differs from the original run's")
    else:
        if run.init_from:
            src = checkpoint_dir(run.init_from)
            # an MSA run continued as an MSA model keeps its trained index branches; from a dense run
            # they start fresh (the CPT start)
            loaded = load_dense_into_msa(src, model, step=run.init_step, index=None if is_msa else False)
            with Checkpointer(src, read_only=True) as dense_ckpt:
                run = dataclasses.replace(run, init_loaded_step=dense_ckpt.resolve_step(run.init_step))
            sharding.shard_model(model, mesh)  # loading placed the weights on the default device
            n_index = sum("index" in k.split("/") for k in loaded)
            say(f"initialised {len(loaded) - n_index} non-index weights from {src} step {run.init_loaded_step} "
                + (f"(and its {n_index} index-branch weights; fresh optimizer)" if n_index
                   else "(index branches fresh)" if is_msa else "(fresh optimizer)"))
        # haystacks of the mixed-in retrieval rows come from the training split too, never from val
        batches = data.BatchIterator(corpus.train, tcfg.batch_size, tcfg.seq_len, seed=run.seed,
                                     task_mix=run.task_mix, tasks=run.mix_tasks, depth_power=run.task_depth_power)
        if log.path.exists() and is_main:
            log.path.unlink()  # no checkpoint to continue from: start the log over
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=1))

    n_params = count_params(model)
    T, span = tcfg.seq_len, mcfg.msa.dense_span
    say(f"model: {run.attention}, {n_params / 1e6:.2f}M params, {mcfg.n_layers} layers "
        f"({mcfg.n_msa_layers} MSA), d_model {mcfg.d_model}, heads {mcfg.n_heads}/{mcfg.n_kv_heads}, {mcfg.dtype}")
    if is_msa:
        say(f"MSA: block {mcfg.msa.block_size} x top-{mcfg.msa.top_k}: a query sees <= {min(span, T)} of {T} keys; "
            f"dense warmup {mcfg.msa.warmup_steps} steps, kl_weight {mcfg.msa.kl_weight}"
            + (f", index LR x {tcfg.index_lr_scale:g}" if tcfg.index_lr_scale != 1.0 else ""))
    if run.task_mix:
        say(f"task mix: {run.task_mix:g} of the rows are retrieval examples ({', '.join(run.mix_tasks)}) at T={T}"
            + (f"; needle depths u ** {run.task_depth_power:g}" if run.task_depth_power != 1.0 else "")
            + (f"; answer bytes weighted x {run.answer_weight:g} in the loss" if run.answer_weight != 1.0 else ""))

    schedule = lr_schedule(tcfg)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len

    def save(step: int) -> None:
        state = dict(batches.state(), step=step)  # batch s is a function of (seed, s): no other state
        ckpt.save(step, model, optimizer, meta=dict(step=step, data=state, rng=dict(seed=run.seed),
                                                   config=run.to_dict(), corpus=corpus.fingerprint))

    def do_eval(step: int) -> dict:
        t0 = time.perf_counter()
        sparse = bool(is_msa and use_sparse(step - 1, mcfg.msa))  # the mode of the step just taken
        row = dict(kind="eval", step=step, **evaluate(model, eval_set, mesh, is_msa=is_msa, sparse=sparse, probe=probe,
                                                      msa=mcfg.msa if is_msa else None))
        row["eval_s"] = time.perf_counter() - t0
        log.write([row])
        if run.plot and is_main:
            plots.plot_run(log.rows(), run_dir / "loss.png", f"{run.attention} T={T} ({run.preset})")
        return row

    names = param_names(model)  # of the gradients in a step's grad_finite
    pending: list[tuple[int, bool, dict]] = []  # steps dispatched but not yet fetched
    seen_modes: set[bool] = set()
    interval = dict(t0=time.perf_counter(), steps=0, excluded_s=0.0)
    last: dict = {}

    def flush() -> None:
        """Fetch pending metrics (one host sync), write their rows with the interval's tokens/s."""
        if not pending:
            return
        fetched = jax.device_get([m for _, _, m in pending])
        elapsed = time.perf_counter() - interval["t0"] - interval["excluded_s"]
        tps = interval["steps"] * tokens_per_step / elapsed if interval["steps"] and elapsed > 0 else None
        rows = []
        for (step, sparse, _), m in zip(pending, fetched):
            try:
                check_finite(step, m, names)
            except NonFiniteError as e:
                log.write(rows)  # the good steps before it
                good = ckpt.latest_step()
                where = (f"the latest checkpoint ({ckpt.directory}/{good}) is the last good state"
                         if good is not None else "there is no checkpoint yet")
                e.args = (f"{e}\nTraining stopped without saving any state of step {step} or later: {where}, "
                          f"and {log.path.name} ends at step {step - 1}. A rerun resumes from there with the same "
                          "batches; if it fails again at this step, change the run (e.g. a lower --lr) in a new "
                          "run directory.",)
                raise
            m = {k: float(v) for k, v in m.items() if k != "grad_finite"}
            rows.append(dict(kind="train", step=step, loss=m["lm_loss"], kl=m["kl"], lr=float(schedule(step - 1)),
                             tokens_per_s=tps, sparse=sparse, grad_norm=m["grad_norm"],
                             index_grad_norm=m.get("index_grad_norm"), total_loss=m["loss"]))
            if "answer_rows" in m:  # this batch's retrieval rows, scored as they were trained on
                rows[-1].update(answer_rates(m))
        log.write(rows)
        last.update(rows[-1])
        pending.clear()
        interval.update(t0=time.perf_counter(), steps=0, excluded_s=0.0)

    bar = tqdm(total=tcfg.steps, initial=start, desc=run.attention, dynamic_ncols=True, file=sys.stdout,
               disable=not (is_main and progress))
    t_run = time.perf_counter()
    step = start
    end = tcfg.steps if run.stop_at is None else max(start, min(tcfg.steps, run.stop_at))
    saved_step = start  # the step of the newest checkpoint (a resumed run's is `start`)
    with StopFlag() as stop, ckpt, bar:
        while step < end and not stop.requested:
            sparse = bool(is_msa and use_sparse(step, mcfg.msa))
            batch = sharding.shard_batch(next(batches), mesh)
            rows = sharding.shard_rows(batches.task_rows(batches.step - 1), mesh) if run.task_mix else None
            t0 = time.perf_counter()
            metrics = sharded_train_step(model, optimizer, batch, mesh=mesh, sparse=sparse,
                                         kl_weight=mcfg.msa.kl_weight, answer_rows=rows,
                                         answer_weight=float(run.answer_weight))
            if sparse not in seen_modes:  # the first step of a mode compiles: keep it out of tokens/s
                jax.block_until_ready(metrics)
                interval["excluded_s"] += time.perf_counter() - t0
                seen_modes.add(sparse)
            else:
                interval["steps"] += 1
            step += 1
            pending.append((step, sparse, metrics))
            eval_now = step % run.eval_every == 0 or step == tcfg.steps
            ckpt_now = run.ckpt_every and step % run.ckpt_every == 0
            save_now = ckpt_now or step == end or stop.requested
            if step % run.log_every == 0 or eval_now or save_now:
                flush()  # before a save: a non-finite step must never reach a checkpoint
                post = dict(loss=f"{last['loss']:.3f}", mode="sparse" if sparse else "dense")
                if is_msa:
                    post["kl"] = f"{last['kl']:.3f}"
                if last.get("tokens_per_s"):
                    post["tok/s"] = f"{last['tokens_per_s']:,.0f}"
                if "val_bpb" in last:
                    post["val_bpb"] = f"{last['val_bpb']:.3f}"
                bar.set_postfix(post, refresh=False)
            if eval_now:
                t0 = time.perf_counter()
                last["val_bpb"] = do_eval(step)["val_bpb"]
                post["val_bpb"] = f"{last['val_bpb']:.3f}"  # this evaluation's, not the previous one's
                bar.set_postfix(post, refresh=False)
                interval["excluded_s"] += time.perf_counter() - t0
            if save_now:
                t0 = time.perf_counter()
                save(step)
                saved_step = step
                interval["excluded_s"] += time.perf_counter() - t0
            bar.update(step - bar.n)
        flush()
        if stop.requested and step != saved_step:  # the signal came after this step had decided not to save
            save(step)
    wall = time.perf_counter() - t_run
    rows = log.rows() if is_main else []
    if step < tcfg.steps:
        if stop.requested:
            say(f"stopped at step {step}, {time.perf_counter() - stop.at:.1f}s after the signal; checkpoint saved in "
                f"{ckpt.directory}. Run again to resume.")
            raise SystemExit(130)
        say(f"reached stop_at {step}; checkpoint saved in {ckpt.directory}. Run again with a later stop_at "
            "(or none) to continue.")
        return dict(steps=step, stopped=True, run_dir=str(run_dir))
    evals = [r for r in rows if r["kind"] == "eval"]
    tps = [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r.get("tokens_per_s")]
    peak = bench.peak_memory_bytes()  # this process's devices; None on the CPU
    summary = dict(steps=step, wall_s=wall, n_params=int(n_params), final_eval=evals[-1] if evals else None,
                   median_tokens_per_s=float(np.median(tps)) if tps else None,
                   median_step_s=tokens_per_step / float(np.median(tps)) if tps else None,
                   peak_memory_gib=peak / 2**30 if peak is not None else None, run_dir=str(run_dir),
                   env=dict(jax=jax.__version__, device=jax.devices()[0].device_kind, n_devices=jax.device_count(),
                            mesh=dict(mesh.shape)))
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if evals:
            e = evals[-1]
            say(f"done: step {step}, val loss {e['val_loss']:.4f} nats/byte ({e['val_bpb']:.3f} bits/byte)"
                + (f", block recall {e['block_recall']:.3f}, score recall {e['score_recall']:.3f}" if is_msa else "")
                + (f", {summary['median_tokens_per_s']:,.0f} tokens/s" if tps else "")
                + (f", peak memory {summary['peak_memory_gib']:.1f} GiB per device" if peak is not None else "")
                + f"; {wall:.0f}s this session")
        say(f"wrote {log.path}" + (f", {run_dir / 'loss.png'}" if run.plot else "") + f", checkpoints in {ckpt.directory}")
    return summary
