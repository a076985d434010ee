"""Deterministic mode: bit-identical results from run to run (and across a stop / resume) on a GPU.

On the CPU, XLA's programs are deterministic already. On a GPU they are not by default: scatter-adds
(the embedding gradient) and some reductions use atomics, and autotuning may pick a different
matmul kernel in each process, so two runs of the same step differ in the last bits and drift apart.
`enable()` sets XLA's `--xla_gpu_deterministic_ops=true`, which makes those ops deterministic (also
cuDNN's fused attention backward) and turns autotuning off, at some speed cost (measured in
BENCHMARKS.md). The Pallas kernels of this project are deterministic in either mode (fixed
summation orders, no atomics).

XLA reads its flags once, when jax starts its backends: `enable()` must run before the first device
work of the process. `train_lm.py --deterministic` (`RunConfig.deterministic`) does it for you; in
your own program call it right after importing jax, or export the flag yourself:

    XLA_FLAGS=--xla_gpu_deterministic_ops=true python my_script.py
"""

from __future__ import annotations

import os

XLA_FLAG = "--xla_gpu_deterministic_ops=true"
_NAME = XLA_FLAG.split("=")[0]


def _flags() -> list[str]:
    return os.environ.get("XLA_FLAGS", "").split()


def is_enabled() -> bool:
    """True when XLA_FLAGS asks for deterministic GPU ops (the last setting of the flag wins)."""
    values = [f.split("=", 1)[1].lower() if "=" in f else "true" for f in _flags() if f.split("=")[0] == _NAME]
    return bool(values) and values[-1] in ("true", "1")


def enable() -> None:
    """Turn deterministic GPU ops on for this process. RuntimeError when jax's backends are already up."""
    if is_enabled():
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "deterministic mode must be chosen before jax starts its backends (XLA reads its flags once): "
            "call msa_jax.determinism.enable() before any device work, or set "
            f"XLA_FLAGS={XLA_FLAG} in the environment")
    os.environ["XLA_FLAGS"] = " ".join([f for f in _flags() if f.split("=")[0] != _NAME] + [XLA_FLAG])
