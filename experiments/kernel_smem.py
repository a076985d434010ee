"""Shared memory, registers and spills of the Triton-Pallas kernels of an MSA layer, on a CPU (no GPU).

Lowers one MSA layer's kernels for an abstract H100 / H200 (sm_90) with the settings they resolve by
default (index top-k, sparse main branch forward and backward, sparse KL, KL forward, fused main + KL
backward, the dense warmup's KL), compiles each kernel's Triton IR with the `triton` package for sm_90
and prints its shared memory (the number a launch checks against 227 KiB), registers and spill
stores (`pallas.triton_smem`). A kernel over the limit fails on the GPU with "Shared memory size limit
exceeded: requested N"; this finds it first. Exits non-zero when a kernel is over.

Needs the `triton` package (in the dev extra; `pip install triton==3.9.0`; no GPU or CUDA driver).

    python experiments/kernel_smem.py --block-size 256 --top-k 8
    python experiments/kernel_smem.py --heads 64 --kv-heads 4 --head-dim 128 --index-dim 128   # paper heads
"""

from __future__ import annotations

import argparse
import json
import sys

from msa_jax.presets import HelpFormatter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--heads", type=int, default=12, help="query heads (the long-context preset's 12)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--index-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=4096, help="tokens (shared memory does not depend on it)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("needs the triton package: pip install triton==3.9.0 (no GPU needed)")

    import jax.numpy as jnp

    from pallas.triton_smem import SMEM_LIMIT, layer_kernels

    rows, refused = layer_kernels(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                  index_dim=args.index_dim, block_size=args.block_size, top_k=args.top_k,
                                  seq_len=args.seq_len, dtype=jnp.dtype(args.dtype))
    for row in rows:
        flag = "  OVER 227 KiB" if row["shared"] > SMEM_LIMIT else ""
        print(f"{row['name']:48s} warps {row['num_warps']} stages {row['num_stages']}: shared {row['shared']:7,d} B "
              f"({row['shared'] / 1024:5.1f} KiB), registers {row['registers']}, "
              f"spill stores {row['spill_stores']} B{flag}")
    for r in refused:
        print(f"refused: {r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, refused=refused), f, indent=1)
    over = [r["name"] for r in rows if r["shared"] > SMEM_LIMIT]
    if over:
        sys.exit(f"over the 227 KiB of an H100 / H200: {', '.join(over)}")


if __name__ == "__main__":
    main()
