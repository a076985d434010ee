"""Train a byte-level dense-GQA or MSA decoder LM on the installed Python code, resumably, on a mesh.

A command line over `msa_jax.loop.train_and_evaluate` (the run directory's files, the MSA recipe,
resume and interrupts are described there). Sizes come from `--preset` (`msa_jax.presets`); every
flag given overrides its preset value. Re-running the same command resumes from the latest
checkpoint with the same losses as an uninterrupted run (bit-identical on a GPU with --deterministic);
Ctrl-C or SIGTERM saves and exits 130; a non-finite loss or gradient stops the run (exit 1) without
saving, naming the step and the parameters that went bad.
Multi-host: start one process per host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set (or under SLURM / Open MPI); see the README.

  python experiments/train_lm.py --preset tiny --attention msa --run-dir runs/tiny_msa
  python experiments/train_lm.py --preset tiny --attention msa --init-from runs/tiny_dense --run-dir runs/tiny_cpt
  python experiments/train_lm.py --preset gpu-small --attention msa --run-dir runs/gpu_msa
"""

from __future__ import annotations

import argparse

from msa_jax import presets, sharding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a byte-level dense or MSA LM on the installed Python code (stdlib + site-packages), "
        "with checkpoints, exact resume and a device mesh.",
        formatter_class=presets.HelpFormatter,
    )
    presets.add_run_arguments(p)
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/<preset>_<attention>)")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    run = presets.run_config_from_args(args)  # validates every size before any device work
    sharding.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from msa_jax.loop import NonFiniteError, train_and_evaluate  # after the distributed start: it touches devices

    try:
        return train_and_evaluate(run, args.run_dir or f"runs/{run.preset}_{run.attention}")
    except NonFiniteError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
