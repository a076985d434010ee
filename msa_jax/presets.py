"""Named presets: the sizes of training runs, and the head shapes of the attention benchmarks.

`RUN_PRESETS[name]` overrides `RunConfig`'s defaults; `run_config(name, **overrides)` builds the
validated config. `add_run_arguments(parser)` gives a script one `--flag` per `RunConfig` field
(a flag that is given wins over the preset), and `run_config_from_args(args)` reads them back, so
every training script takes the same flags with the same meaning.

`BENCH_SHAPES[name]` are the attention shapes the kernel benchmarks use: "paper" is the MSA
paper's head configuration (docs/algorithm.md §8), "cpu" a tiny one for smoke runs off a GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

from msa_jax.config import IMPLS, RunConfig

RUN_PRESETS: dict[str, dict] = {
    # 2 CPU cores: about a minute per model (compilation included).
    "tiny": dict(),  # RunConfig's defaults
    # The quickstart: 2 CPU cores, ~7 minutes for a dense and an MSA model. Each query of the MSA
    # model sees at most 4 x 32 = 128 of up to 1024 keys.
    "quickstart": dict(
        steps=180, batch_size=2, seq_len=1024, block_size=32, top_k=4, index_dim=32, d_model=128, n_layers=4,
        n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384, n_dense_layers=1, msa_warmup_steps=36, eval_every=45,
        eval_batches=4, ckpt_every=0, max_bytes=None, sources="stdlib",
    ),
    # One GPU, a few minutes per model (T = 8192: each query sees <= 2048 keys). 25M parameters.
    "gpu-small": dict(
        steps=200, batch_size=8, seq_len=8192, block_size=128, top_k=16, index_dim=64, d_model=512, n_layers=8,
        n_heads=8, n_kv_heads=2, head_dim=64, d_ff=1536, n_dense_layers=1, lr=1e-3, msa_warmup_steps=40,
        eval_every=50, eval_batches=8, ckpt_every=50, log_every=10, max_bytes=None, dtype="bfloat16",
    ),
    # One or more GPUs, longer context and a bigger model (152M parameters).
    "gpu": dict(
        steps=2000, batch_size=8, seq_len=32768, block_size=128, top_k=16, index_dim=128, d_model=1024,
        n_layers=12, n_heads=16, n_kv_heads=4, head_dim=64, d_ff=3072, n_dense_layers=2, lr=6e-4,
        msa_warmup_steps=200, eval_every=200, eval_batches=8, ckpt_every=200, log_every=10, max_bytes=None,
        dtype="bfloat16",
    ),
    # The long-context study (docs/long_context.md): one H200 per model, T = 16384, half of the rows
    # retrieval examples (16K examples per run: a 0.43M CPU model needed 30-110K to learn copying at
    # T = 128). 52M parameters; block 128 x top-16: each query attends to <= 2048 keys. Sized from the gpu preset's ~105K tokens/s (152M, T = 32768, one H200): about 3x fewer
    # FLOPs per token, so 4000 steps (524M tokens) should take 30-60 minutes; not timed yet. The study's
    # runs override two defaults: --task-mix 1.0 --rope-theta 500000 (with these, half the rows and base
    # 10,000, nothing retrieved at 16K: docs/long_context.md); the defaults stay so that the earlier
    # probes' commands still mean what they meant.
    "long-context": dict(
        steps=4000, batch_size=8, seq_len=16384, block_size=128, top_k=16, index_dim=64, d_model=768, n_layers=8,
        n_heads=12, n_kv_heads=4, head_dim=64, d_ff=2048, n_dense_layers=1, lr=1e-3, msa_warmup_steps=400,
        eval_every=500, eval_batches=8, ckpt_every=500, keep=8, log_every=10, max_bytes=None, dtype="bfloat16",
        task_mix=0.5,  # keep=8: every checkpoint stays, so a converted run can start from any of them
    ),
}

# Ablations of the long-context study: flags over `--preset long-context --attention msa`. The
# first three keep the attended budget at 2048 keys per query; the top-k ones change it. kl_weight
# is ablated only at 0 (KL off): with Adam any value > 0 moves the index branch about the same; its
# learning rate is what changes that (index_lr_scale).
LONG_CONTEXT_ABLATIONS: dict[str, dict] = {
    "block64-top32": dict(block_size=64, top_k=32),
    "block128-top16": dict(),  # the preset itself
    "block256-top8": dict(block_size=256, top_k=8),
    "kl-off": dict(kl_weight=0.0),
    "index-lr-x0.1": dict(index_lr_scale=0.1),
    "index-lr-x3": dict(index_lr_scale=3.0),
    "index-lr-x10": dict(index_lr_scale=10.0),
    "warmup-0": dict(msa_warmup_steps=0),
    "warmup-1600": dict(msa_warmup_steps=1600),
    "top8": dict(top_k=8),
    "top32": dict(top_k=32),
    "index-nope": dict(index_rope=False),  # does the index branch's RoPE keep it from far blocks?
    # index-nope found far needles and missed near ones: does keeping the block before the local one fix that?
    "index-nope-local2": dict(index_rope=False, local_blocks=2),
    # at 16K it missed only needles in the context's first block: does always keeping that block fix it?
    "index-nope-sink1": dict(index_rope=False, sink_blocks=1),
    # both: the first block for needles at the start, the previous one for those before the question and
    # the loss (at T = 512 on the CPU the previous block took the RoPE-free index's +1.7% bits/byte to +0.4%)
    "index-nope-local2-sink1": dict(index_rope=False, local_blocks=2, sink_blocks=1),
}

BENCH_SHAPES: dict[str, dict] = {
    "cpu": dict(batch=1, heads=4, kv_heads=1, head_dim=32, index_dim=32, block_size=16, top_k=4),
    "paper": dict(batch=1, heads=64, kv_heads=4, head_dim=128, index_dim=128, block_size=128, top_k=16),
}


def run_config(preset: str = "tiny", **overrides) -> RunConfig:
    """RunConfig of a named preset with `overrides` (None values are ignored)."""
    if preset not in RUN_PRESETS:
        raise ValueError(f"preset: expected one of {sorted(RUN_PRESETS)}, got {preset!r}")
    values = {**RUN_PRESETS[preset], "preset": preset}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(**values)


# Flags: (field, type, help). The default of every flag is None ("the preset's value").
_FLAGS = (
    ("seed", int, "init and data seed"),
    ("steps", int, "optimizer steps"),
    ("batch_size", int, "global batch (all devices)"),
    ("seq_len", int, "tokens (bytes) per training window"),
    ("lr", float, "peak learning rate (AdamW, linear warmup, cosine decay)"),
    ("lr_warmup_steps", int, "learning-rate warmup steps (default: 5%% of --steps)"),
    ("msa_warmup_steps", int, "MSA: dense warmup steps before top-k routing"),
    ("kl_weight", float, "MSA: weight of the index KL loss. Only the index branch gets the KL's gradient, clipped "
                         "on its own and fed to Adam, which is invariant to the gradient's scale: every value > 0 "
                         "gives nearly the same update, 0 turns the KL off. Ablate 0 vs > 0 and --index-lr-scale"),
    ("index_lr_scale", float, "MSA: the index branch's learning rate as a multiple of --lr (same schedule; 0 "
                              "freezes it): what sets how fast the index branch learns"),
    ("block_size", int, "MSA: KV block size"),
    ("top_k", int, "MSA: blocks per query and group, the local block included"),
    ("local_blocks", int, "MSA: always-selected blocks ending at the query's own, counted in --top-k (the paper: 1; "
                          "2 also keeps the block before it, an ablation)"),
    ("sink_blocks", int, "MSA: always-selected leading blocks, counted in --top-k after the local ones (the paper: "
                         "0; 1 keeps the context's first block, an ablation)"),
    ("index_dim", int, "MSA: index head dim"),
    ("d_model", int, None),
    ("n_layers", int, None),
    ("n_heads", int, "query heads"),
    ("n_kv_heads", int, "KV heads (GQA groups)"),
    ("head_dim", int, None),
    ("d_ff", int, "SwiGLU hidden size"),
    ("n_dense_layers", int, "leading layers kept dense in an MSA model"),
    ("rope_theta", float, "RoPE base (wavelengths up to 2 pi theta tokens); a stage that extends a run to a "
                          "longer --seq-len (--init-from) may raise it, as long-context continued pre-training does"),
    ("eval_every", int, "steps between evaluations (and at the end)"),
    ("eval_batches", int, "validation batches per evaluation"),
    ("log_every", int, "steps between host syncs / metric writes"),
    ("ckpt_every", int, "steps between checkpoints (0: only at the end and on an interrupt)"),
    ("keep", int, "checkpoints kept"),
    ("max_bytes", int, "cap on the corpus size in bytes"),
    ("sources", str, "comma list of stdlib, site-packages or directories of *.py files"),
    ("task_mix", float, "share (in [0, 1]) of each batch's rows that are long-context retrieval examples at "
                        "--seq-len (fresh needles, values and depths every batch, haystacks from the training "
                        "split; the loss is the plain LM loss); 0: code only"),
    ("task_mix_tasks", str, "comma list of the retrieval tasks mixed in: passkey, multikey, variable_tracking"),
    ("task_depth_power", float, "with --task-mix: the needles' depths are u ** P for u uniform in [0, 1) (1: "
                                "uniform; 2: mean depth 1/3, a third of the needles in the first 10%% of the "
                                "context, the farthest from the question)"),
    ("answer_weight", float, "with --task-mix: the loss weight of each retrieval row's answer bytes (the LM loss "
                             "becomes the weighted mean; 1: the plain LM loss, 0: answers not trained on). At long "
                             "T the 5 answer bytes are a tiny share of a row's loss: e.g. 100 at T = 16K gives them "
                             "about the share they have at T = 512"),
    ("mesh", str, "device mesh, e.g. data=2,fsdp=2,tensor=2 or context=4,data=2 (context: each sequence split "
                  "over that many devices; default: data=<all devices>)"),
    ("init_from", str, "run directory whose weights start this run (fresh optimizer): a dense run converted to "
                       "MSA (continued pre-training; the index branches start fresh), or a next stage at another "
                       "--seq-len (a length curriculum: retrieval is learned fastest at short T; an MSA run into "
                       "an MSA model keeps its trained index branches)"),
    ("init_step", int, "step of --init-from to load (default: its latest)"),
    ("stop_at", int, "stop after this step with a checkpoint, as on Ctrl-C; for jobs with a time limit"),
)


class HelpFormatter(argparse.HelpFormatter):
    """The scripts' --help: each option's default where it has one, also for options without a help text;
    none for a default of None (the preset's value, which the help names) or for on/off flags (off unless
    given)."""

    @staticmethod
    def _has_default(action) -> bool:
        return bool(action.option_strings) and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)

    def _format_action(self, action):
        if action.help is None and self._has_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or not self._has_default(action):
            return text
        return f"{text} (default: %(default)s)"


def _preset_help(field: str) -> str:
    default = RunConfig()
    vals = ", ".join(f"{n} {RUN_PRESETS[n].get(field, getattr(default, field))}" for n in RUN_PRESETS)
    return f"[presets: {vals}]"


def add_run_arguments(p: argparse.ArgumentParser, *, attention=("dense", "msa"), default_preset: str = "tiny",
                      default_attention: str = "msa") -> None:
    """One `--flag` per RunConfig field (default None: the preset's value)."""
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), default=default_preset, help="sizes; flags override them")
    p.add_argument("--attention", choices=attention, default=default_attention)
    p.add_argument("--impl", choices=IMPLS, default=None, help="attention ops backend (default: auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help=_preset_help("dtype"))
    for field, typ, text in _FLAGS:
        text = f"{text} {_preset_help(field)}" if text else _preset_help(field)
        p.add_argument(f"--{field.replace('_', '-')}", type=typ, default=None, help=text)
    p.add_argument("--no-index-rope", dest="index_rope", action="store_false", default=None,
                   help="MSA: no RoPE on the index queries and keys (block scores from content alone; default: the "
                   "main q/k's partial RoPE, as in the paper)")
    p.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="skip the loss plot")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic GPU ops: bit-identical losses across runs and resumes, somewhat slower "
                   "(msa_jax.determinism; the CPU is deterministic anyway)")


def run_config_from_args(args: argparse.Namespace, **overrides) -> RunConfig:
    """The preset of `args.preset`, overridden by the flags given (and then by `overrides`).

    Invalid values raise SystemExit with the config's message (a command-line error)."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and k != "preset" and v is not None}
    given.update(overrides)
    try:
        return run_config(args.preset, **given)
    except ValueError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
