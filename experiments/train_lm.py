"""Train a byte-level dense-GQA or MSA decoder LM on the installed Python code, resumably, on a mesh.

The MSA recipe of MSA_SPEC section 6: loss = LM + kl_weight * sum of the layers' index KL; the index
branch reads stop_gradient(x) and the KL's teacher is detached; `--msa-warmup-steps` of dense
attention (KL over the full causal support) before top-k routing (KL over the selected support);
`--init-from RUN_DIR` starts an MSA model from a dense run's checkpoint (fresh index projections:
the paper's continued pre-training).

Run directory (`--run-dir`):
  config.json     the resolved configuration (a resumed run must match it)
  metrics.jsonl   one JSON object per line: a "train" row per step (step, loss = LM loss in
                  nats/byte, kl, lr, grad_norm, tokens_per_s, sparse, ...) and an "eval" row per
                  evaluation (step, val_loss, val_bpb, val_kl, block_recall, score_recall)
  loss.png        train / val loss, KL and recall curves (redrawn at every eval)
  checkpoints/    Orbax checkpoints (params, optimizer, step, data iterator state, RNG seed)

Re-running the same command resumes from the latest checkpoint and yields the same losses as an
uninterrupted run. Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and exits;
a second Ctrl-C aborts at once. Multi-host: start one process per host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under SLURM / Open MPI), see the README.

  python experiments/train_lm.py --preset tiny --attention msa --run-dir runs/tiny_msa
  python experiments/train_lm.py --preset tiny --attention msa --init-from runs/tiny_dense --run-dir runs/tiny_cpt
  python experiments/train_lm.py --preset gpu-small --attention msa --run-dir runs/gpu_msa
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import signal
import sys
import time

try:
    import msa_jax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from msa_jax import data
from msa_jax import sharding as S
from msa_jax.config import IMPLS, ModelConfig, MSAConfig, TrainConfig

LN2 = math.log(2.0)

# Sizes per preset; any flag given on the command line wins.
PRESETS = {
    # 2 CPU cores: ~1 minute per model (compilation included).
    "tiny": dict(
        steps=100, batch_size=2, seq_len=512, block_size=32, top_k=4, index_dim=16,
        d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192, n_dense_layers=0,
        lr=3e-3, msa_warmup_steps=20, eval_every=25, eval_batches=2, ckpt_every=50, log_every=5,
        max_bytes=4_000_000, sources="stdlib,site-packages", dtype="float32",
    ),
    # One H100, a few minutes per model with impl=xla (T=8192: each query sees <= 2048 keys).
    "gpu-small": dict(
        steps=200, batch_size=8, seq_len=8192, block_size=128, top_k=16, index_dim=64,
        d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=1536, n_dense_layers=1,
        lr=1e-3, msa_warmup_steps=40, eval_every=50, eval_batches=8, ckpt_every=50, log_every=10,
        max_bytes=None, sources="stdlib,site-packages", dtype="bfloat16",
    ),
    # One or more GPUs, longer context and a bigger model.
    "gpu": dict(
        steps=2000, batch_size=8, seq_len=32768, block_size=128, top_k=16, index_dim=128,
        d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4, head_dim=64, d_ff=3072, n_dense_layers=2,
        lr=6e-4, msa_warmup_steps=200, eval_every=200, eval_batches=8, ckpt_every=200, log_every=10,
        max_bytes=None, sources="stdlib,site-packages", dtype="bfloat16",
    ),
}
# Keys that may change when a run is resumed (everything else must match config.json).
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_batches", "ckpt_every", "keep", "log_every", "mesh", "init_from",
                     "init_step", "plot", "impl", "stop_at"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a byte-level dense or MSA LM on the installed Python code (stdlib + site-packages), "
        "with checkpoints, exact resume and a device mesh.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="sizes; flags below override them")
    p.add_argument("--attention", choices=("dense", "msa"), default="msa")
    p.add_argument("--impl", choices=IMPLS, default="auto", help="attention ops backend")
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/<preset>_<attention>)")
    p.add_argument("--seed", type=int, default=0, help="init and data seed")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (all devices)")
    p.add_argument("--seq-len", type=int, help="tokens (bytes) per training window")
    p.add_argument("--lr", type=float, help="peak learning rate (warmup-cosine)")
    p.add_argument("--msa-warmup-steps", type=int, help="dense warmup steps before top-k routing (MSA)")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of the index KL loss (MSA)")
    p.add_argument("--block-size", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--index-dim", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--n-kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--d-ff", type=int)
    p.add_argument("--n-dense-layers", type=int, help="leading layers kept dense in an MSA model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int, help="validation batches per eval")
    p.add_argument("--log-every", type=int, help="steps between host syncs / metric writes")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (0: only at the end / on interrupt)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--init-from", default=None, help="dense run dir (or checkpoint dir) to start an MSA model from")
    p.add_argument("--init-step", type=int, default=None, help="step of --init-from to load (default: its latest)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step as on Ctrl-C (checkpoint, exit 130); for jobs with a time limit")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: data=<all devices>)")
    p.add_argument("--max-bytes", type=int, help="cap on the corpus size (bytes)")
    p.add_argument("--sources", help="comma list of stdlib, site-packages or directories of *.py files")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip loss.png")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """The preset, overridden by the flags that were given."""
    cfg = dict(PRESETS[args.preset])
    for key in cfg:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg["msa_warmup_steps"] = min(cfg["msa_warmup_steps"], cfg["steps"])
    cfg.update(preset=args.preset, attention=args.attention, impl=args.impl, seed=args.seed,
               kl_weight=args.kl_weight, keep=args.keep, mesh=args.mesh, init_from=args.init_from,
               init_step=args.init_step, init_loaded_step=None, stop_at=args.stop_at, plot=args.plot)
    cfg["lr_warmup_steps"] = max(1, round(0.05 * cfg["steps"]))
    for key in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')}: expected an int >= 1, got {cfg[key]}")
    if cfg["ckpt_every"] < 0:
        raise SystemExit(f"--ckpt-every: expected an int >= 0, got {cfg['ckpt_every']}")
    if cfg["init_from"] and cfg["attention"] != "msa":
        raise SystemExit("--init-from: converts a dense checkpoint into an MSA model; use it with --attention msa")
    return cfg


def make_configs(cfg: dict) -> tuple[ModelConfig, TrainConfig]:
    msa = MSAConfig(block_size=cfg["block_size"], top_k=cfg["top_k"], index_dim=cfg["index_dim"],
                    kl_weight=cfg["kl_weight"], warmup_steps=cfg["msa_warmup_steps"])
    mcfg = ModelConfig(
        vocab_size=data.VOCAB_SIZE, d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
        n_kv_heads=cfg["n_kv_heads"], head_dim=cfg["head_dim"], d_ff=cfg["d_ff"], attention=cfg["attention"],
        n_dense_layers=cfg["n_dense_layers"], msa=msa, impl=cfg["impl"], dtype=cfg["dtype"],
    )
    tcfg = TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"], seq_len=cfg["seq_len"],
                       learning_rate=cfg["lr"], lr_warmup_steps=min(cfg["lr_warmup_steps"], cfg["steps"]),
                       seed=cfg["seed"])
    return mcfg, tcfg


def model_from_config(cfg: dict):
    """A fresh DecoderLM for a resolved config dict (as in config.json)."""
    from msa_jax.model import DecoderLM

    return DecoderLM(make_configs(cfg)[0], seed=cfg["seed"])


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A run dir's `checkpoints/` (or `path` itself when it is already a checkpoint directory)."""
    path = pathlib.Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


# ------------------------------------------------------------------------------------- logging


class MetricsLog:
    """Append-only JSONL of metric rows, written by process 0; `truncate(step)` drops rows > step."""

    def __init__(self, path: pathlib.Path, enabled: bool):
        self.path, self.enabled = path, enabled

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


def plot_run(rows: list[dict], path: pathlib.Path, title: str) -> bool:
    """loss.png: LM loss (bits/byte, train smoothed + val), KL and MSA recall against step."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    has_msa = any(r.get("block_recall") is not None for r in evals)
    fig, axes = plt.subplots(1, 3 if has_msa else 1, figsize=(15 if has_msa else 6, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train]) / LN2
        w = max(1, min(20, loss.size // 10))
        ax.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), lw=1, label="train")
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
        switch = next((r["step"] for r in train if r.get("sparse")), None)
        for a in axes[0]:
            if switch is not None and switch > 1:
                a.axvline(switch - 1, color="gray", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class StopFlag:
    """Ctrl-C / SIGTERM set a flag checked between steps; a second Ctrl-C raises at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint and stopping "
              "(Ctrl-C again to abort at once)", flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------- main


def evaluate(model, eval_set, mesh, *, is_msa: bool) -> dict:
    """Mean val metrics over the fixed windows; an MSA model is evaluated sparse, with recall."""
    import jax

    from msa_jax.train import sharded_eval_step

    totals: dict[str, float] = {}
    for batch in eval_set:
        m = jax.device_get(sharded_eval_step(model, batch, mesh=mesh, sparse=is_msa, with_recall=is_msa))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {k: v / len(eval_set) for k, v in totals.items()}
    return dict(val_loss=out["lm_loss"], val_bpb=out["lm_loss"] / LN2, val_kl=out.get("kl") if is_msa else None,
                block_recall=out.get("block_recall"), score_recall=out.get("score_recall"))


def check_resume(saved: dict, cfg: dict) -> list[str]:
    """Differences between a saved config and this one; SystemExit for ones that break the resume."""
    diffs = [k for k in sorted(set(saved) | set(cfg)) if saved.get(k) != cfg.get(k)]
    fatal = [k for k in diffs if k not in RESUMABLE_CHANGES]
    if fatal:
        lines = [f"  {k}: checkpoint {saved.get(k)!r} vs now {cfg.get(k)!r}" for k in fatal]
        raise SystemExit("cannot resume: the run directory holds a different run:\n" + "\n".join(lines)
                         + "\nuse another --run-dir (or delete this one) to start over")
    return diffs


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    multi = S.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from msa_jax.checkpoint import Checkpointer, load_dense_into_msa
    from msa_jax.model import count_params
    from msa_jax.train import lr_schedule, make_optimizer, sharded_train_step, use_sparse

    mcfg, tcfg = make_configs(cfg)  # validates every size
    is_main = jax.process_index() == 0
    run_dir = pathlib.Path(args.run_dir or f"runs/{cfg['preset']}_{cfg['attention']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)
    say = print if is_main else (lambda *a, **k: None)

    mesh = S.make_mesh(cfg["mesh"] or f"data={jax.device_count()}")
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tcfg.batch_size % n_batch_shards:
        raise SystemExit(f"--batch-size {tcfg.batch_size} must be a multiple of data*fsdp = {n_batch_shards} "
                         f"(mesh {dict(mesh.shape)})")
    say(f"jax {jax.__version__} | {jax.process_count()} process(es), {jax.device_count()} device(s) "
        f"[{jax.devices()[0].device_kind}] | mesh {dict(mesh.shape)} | python {platform.python_version()}"
        + (" | distributed" if multi else ""))

    corpus = data.load_corpus(cfg["max_bytes"], sources=tuple(cfg["sources"].split(",")))
    say(f"corpus: {corpus.summary()}")
    eval_set = data.eval_batches(corpus.val, tcfg.batch_size, tcfg.seq_len, cfg["eval_batches"])

    model = model_from_config(cfg)
    optimizer = make_optimizer(model, tcfg)
    S.shard_model(model, mesh)
    S.shard_optimizer(optimizer, mesh)
    is_msa = mcfg.attention == "msa"

    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg["keep"])
    start = 0
    if ckpt.latest_step() is not None:
        saved_cfg = ckpt.restore_meta()["config"]
        cfg["init_loaded_step"] = saved_cfg.get("init_loaded_step")
        changed = check_resume(saved_cfg, cfg)
        meta = ckpt.restore(model, optimizer)  # into the current (sharded) layout
        start = int(meta["step"])
        batches = data.BatchIterator.from_state(corpus.train, meta["data"])
        log.truncate(start)
        say(f"resumed from {ckpt.directory}/{start} (step {start}/{tcfg.steps})"
            + (f"; changed: {', '.join(changed)}" if changed else ""))
        if "steps" in changed:
            say("  note: --steps changed, so the cosine LR schedule differs from the original run's")
    else:
        if cfg["init_from"]:
            src = checkpoint_dir(cfg["init_from"])
            loaded = load_dense_into_msa(src, model, step=cfg["init_step"])
            with Checkpointer(src, read_only=True) as dense_ckpt:
                cfg["init_loaded_step"] = dense_ckpt.resolve_step(cfg["init_step"])
            S.shard_model(model, mesh)  # loading placed the weights on the default device
            say(f"initialised {len(loaded)} non-index weights from {src} step {cfg['init_loaded_step']} "
                "(index branches fresh)")
        batches = data.BatchIterator(corpus.train, tcfg.batch_size, tcfg.seq_len, seed=cfg["seed"])
        if log.path.exists() and is_main:
            log.path.unlink()  # no checkpoint to continue from: start the log over
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=1))

    n_params = count_params(model)
    T, span = tcfg.seq_len, mcfg.msa.top_k * mcfg.msa.block_size
    say(f"model: {cfg['attention']}, {n_params / 1e6:.2f}M params, {mcfg.n_layers} layers "
        f"({mcfg.n_msa_layers} MSA), d_model {mcfg.d_model}, heads {mcfg.n_heads}/{mcfg.n_kv_heads}, {mcfg.dtype}")
    if is_msa:
        say(f"MSA: block {mcfg.msa.block_size} x top-{mcfg.msa.top_k}: a query sees <= {min(span, T)} of {T} keys; "
            f"dense warmup {mcfg.msa.warmup_steps} steps, kl_weight {mcfg.msa.kl_weight}")

    schedule = lr_schedule(tcfg)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len

    def save(step: int) -> None:
        state = dict(batches.state(), step=step)  # batch s is a function of (seed, s): no other state
        ckpt.save(step, model, optimizer, meta=dict(step=step, data=state, rng=dict(seed=cfg["seed"]),
                                                   config=cfg, corpus=corpus.fingerprint))

    def do_eval(step: int) -> dict:
        t0 = time.perf_counter()
        row = dict(kind="eval", step=step, **evaluate(model, eval_set, mesh, is_msa=is_msa))
        row["eval_s"] = time.perf_counter() - t0
        log.write([row])
        if cfg["plot"] and is_main:
            plot_run(log.rows(), run_dir / "loss.png", f"{cfg['attention']} T={T} ({cfg['preset']})")
        return row

    pending: list[tuple[int, bool, dict]] = []  # steps dispatched but not yet fetched
    seen_modes: set[bool] = set()
    interval = dict(t0=time.perf_counter(), steps=0, excluded_s=0.0)
    last = {}

    def flush() -> None:
        """Fetch pending metrics (one host sync), write their rows with the interval's tokens/s."""
        if not pending:
            return
        fetched = jax.device_get([m for _, _, m in pending])
        elapsed = time.perf_counter() - interval["t0"] - interval["excluded_s"]
        tps = interval["steps"] * tokens_per_step / elapsed if interval["steps"] and elapsed > 0 else None
        rows = []
        for (step, sparse, _), m in zip(pending, fetched):
            m = {k: float(v) for k, v in m.items()}
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step}: {m}")
            rows.append(dict(kind="train", step=step, loss=m["lm_loss"], kl=m["kl"], lr=float(schedule(step - 1)),
                             tokens_per_s=tps, sparse=sparse, grad_norm=m["grad_norm"],
                             index_grad_norm=m.get("index_grad_norm"), total_loss=m["loss"]))
        log.write(rows)
        last.update(rows[-1])
        pending.clear()
        interval.update(t0=time.perf_counter(), steps=0, excluded_s=0.0)

    bar = tqdm(total=tcfg.steps, initial=start, desc=cfg["attention"], dynamic_ncols=True, file=sys.stdout,
               disable=not is_main)
    t_run = time.perf_counter()
    step = start
    end = tcfg.steps if cfg["stop_at"] is None else max(start, min(tcfg.steps, cfg["stop_at"]))
    with StopFlag() as stop:
        while step < end and not stop.requested:
            sparse = bool(is_msa and use_sparse(step, mcfg.msa))
            batch = S.shard_batch(next(batches), mesh)
            t0 = time.perf_counter()
            metrics = sharded_train_step(model, optimizer, batch, mesh=mesh, sparse=sparse,
                                           kl_weight=mcfg.msa.kl_weight)
            if sparse not in seen_modes:  # first step of a mode compiles: keep it out of tokens/s
                jax.block_until_ready(metrics)
                interval["excluded_s"] += time.perf_counter() - t0
                seen_modes.add(sparse)
            else:
                interval["steps"] += 1
            step += 1
            pending.append((step, sparse, metrics))
            eval_now = step % cfg["eval_every"] == 0 or step == tcfg.steps
            ckpt_now = cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0
            if step % cfg["log_every"] == 0 or eval_now or ckpt_now or stop.requested:
                flush()
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
                interval["excluded_s"] += time.perf_counter() - t0
            if ckpt_now or step == end or stop.requested:
                t0 = time.perf_counter()
                save(step)
                interval["excluded_s"] += time.perf_counter() - t0
            bar.update(step - bar.n)
        flush()
    bar.close()
    ckpt.close()
    wall = time.perf_counter() - t_run
    rows = log.rows() if is_main else []
    if step < tcfg.steps:
        if stop.requested:
            say(f"stopped at step {step}; checkpoint saved in {ckpt.directory}. Re-run the same command to resume.")
            raise SystemExit(130)
        say(f"reached --stop-at {step}; checkpoint saved in {ckpt.directory}. Re-run with a later --stop-at "
            "(or none) to continue.")
        return dict(steps=step, stopped=True, run_dir=str(run_dir))
    evals = [r for r in rows if r["kind"] == "eval"]
    tps = [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r.get("tokens_per_s")]
    summary = dict(steps=step, wall_s=wall, n_params=int(n_params), final_eval=evals[-1] if evals else None,
                   median_tokens_per_s=float(np.median(tps)) if tps else None, run_dir=str(run_dir),
                   env=dict(jax=jax.__version__, device=jax.devices()[0].device_kind, n_devices=jax.device_count()))
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if evals:
            e = evals[-1]
            say(f"done: step {step}, val loss {e['val_loss']:.4f} nats/byte ({e['val_bpb']:.3f} bits/byte)"
                + (f", block recall {e['block_recall']:.3f}, score recall {e['score_recall']:.3f}" if is_msa else "")
                + (f", {summary['median_tokens_per_s']:,.0f} tokens/s" if tps else "") + f"; {wall:.0f}s this session")
        say(f"wrote {log.path}" + (f", {run_dir / 'loss.png'}" if cfg["plot"] else "") + f", checkpoints in {ckpt.directory}")
    return summary


if __name__ == "__main__":
    main()
