"""Shared memory, registers and spills of the Triton-Pallas kernels of an MSA layer, on a CPU (no GPU).

Lowers one MSA layer's kernels for an abstract H100 / H200 (sm_90) with the shapes and settings they
resolve by default: the index top-k, the sparse main branch forward and backward, the sparse KL with
its gradients, the KL forward, and the dense warmup's full-support KL. Then compiles each kernel's
Triton IR with the `triton` package for sm_90 and reads its shared memory (Triton's allocation, the
number a GPU launch checks against 227 KiB), and ptxas's registers and spill stores. A kernel over the
limit fails on the GPU with "Shared memory size limit exceeded: requested N": this finds it first
(at block 256, the fused KL backward asked for 233,472 B, which is what this script reports for it).

The Mosaic GPU kernels (the forward and backward that Hopper runs for bfloat16 where they apply) are
not Triton: their lowering checks their own shared memory (tests/test_mgpu_*.py). This script lowers
the Triton ones, which every GPU can run.

Needs the `triton` package (not a dependency of the project: `pip install triton==3.9.0`; no GPU or
CUDA driver needed). Its allocation is the one that reproduces both numbers seen on an H200 with jax
0.11.2: 233,472 B for the kernel that failed there, 229,376 B (fits) for the fused main + KL backward
at the paper's heads, which ran there; 3.5.1 and 3.7.1 put the latter at 262,144 B. Other versions'
numbers are estimates.

    python experiments/kernel_smem.py --block-size 256 --top-k 8
    python experiments/kernel_smem.py --heads 64 --kv-heads 4 --head-dim 128 --index-dim 128   # paper heads
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns without it (no effect on memory)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import lowering as triton_lowering  # noqa: E402

from pallas import index_kl, index_kl_full, index_topk  # noqa: E402
from pallas import sparse_attention as main_branch  # noqa: E402

SMEM_LIMIT = 227 * 1024  # H100 / H200 shared memory per block


def lower_for_h100(fn, *args) -> tuple[str, list[str]]:
    """(the lowered module's text, the Triton IR of each Triton-Pallas kernel as text, in order)."""
    texts = []
    orig = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = orig(*a, **k)
        texts.append(result.module.operation.get_asm())
        return result

    ad = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=ad)
    triton_lowering.lower_jaxpr_to_triton_module = capture
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = orig
    return text, texts


def kernels(fn, *args) -> list[dict]:
    """[{name, num_warps, num_stages, ttir}] of the Triton kernels fn launches."""
    text, irs = lower_for_h100(fn, *args)
    cfgs = re.findall(r'name = "([^"]*)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    if len(cfgs) != len(irs):
        raise RuntimeError(f"{len(cfgs)} kernel launches but {len(irs)} Triton modules: lowering format changed")
    return [dict(name=n, num_stages=int(s), num_warps=int(w), ttir=ir) for (n, s, w), ir in zip(cfgs, irs)]


def compile_sm90(kernel: dict) -> dict:
    """Compile one kernel's Triton IR for sm_90: shared bytes, registers, spill stores (ptxas -v)."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(kernel["ttir"])
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=kernel["num_warps"], num_stages=kernel["num_stages"]))
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        log = ""
        for name in ("ptxas-blackwell", "ptxas"):  # the bundled ptxas that takes this PTX version
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
            if os.path.exists(ptxas):
                proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull],
                                      capture_output=True, text=True)
                if proc.returncode == 0:
                    log = proc.stderr
                    break
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return dict(shared=k.metadata.shared, registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spills.group(1)) if spills else None)


def layer_kernels(args) -> list[dict]:
    """The Triton kernels of one MSA layer's training step (+ the KL forward, the fused main + KL backward
    of `ops.sparse_attention_and_index_kl` and the dense warmup's KL) at these sizes."""
    B, T, H, R, D, Di, bs = 1, args.seq_len, args.heads, args.kv_heads, args.head_dim, args.index_dim, args.block_size
    top_k = min(args.top_k, -(-T // bs))
    dt = jnp.dtype(args.dtype)
    S = jax.ShapeDtypeStruct
    q, k = S((B, T, H, D), dt), S((B, T, R, D), dt)
    iq, ik = S((B, T, R, Di), dt), S((B, T, Di), dt)
    ids, lse, w = S((B, T, R, top_k), jnp.int32), S((B, T, H), jnp.float32), S((B, T), jnp.float32)

    def sparse_step(q, k, v, iq, ik, ids, lse, w):
        def loss(q, k, v, iq, ik):
            o, _ = main_branch.sparse_attention(q, k, v, ids, block_size=bs, fwd_kernel="triton",
                                                bwd_kernel="triton", interpret=False)
            kl = index_kl.index_kl_sum(q, k, iq, ik, ids, lse, w, block_size=bs, interpret=False)
            return o.astype(jnp.float32).sum() + kl.sum()

        grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, iq, ik)
        sel = index_topk.select_blocks(iq, ik, block_size=bs, top_k=top_k, interpret=False)
        return grads, sel, index_kl.index_kl(q, k, iq, ik, ids, lse, block_size=bs, interpret=False)

    def fused_step(q, k, v, iq, ik, ids, w):  # ops.sparse_attention_and_index_kl: the KL gradient in the main bwd
        def loss(q, k, v, iq, ik):
            out = index_kl.sparse_attention_with_kl_grad(q, k, v, iq, ik, ids, w, block_size=bs, interpret=False)
            return sum(x.astype(jnp.float32).sum() for x in jax.tree.leaves(out) if x.dtype != jnp.int32)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, iq, ik)

    def warmup_step(q, k, iq, ik, w):  # the dense warmup's KL over the full causal support
        return jax.grad(lambda iq, ik: index_kl_full.index_kl_full_sum(q, k, iq, ik, w, interpret=False).sum(),
                        argnums=(0, 1))(iq, ik)

    return (kernels(sparse_step, q, k, k, iq, ik, ids, lse, w) + kernels(fused_step, q, k, k, iq, ik, ids, w)
            + kernels(warmup_step, q, k, iq, ik, w))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    try:
        found = layer_kernels(args)
    except ValueError as e:  # a kernel's own limits (e.g. a block the backward does not take)
        sys.exit(f"the kernels refuse these sizes: {e}")
    rows, seen = [], set()
    for kern in found:
        if kern["name"] in seen:
            continue
        seen.add(kern["name"])
        row = dict(name=kern["name"], num_warps=kern["num_warps"], num_stages=kern["num_stages"], **compile_sm90(kern))
        rows.append(row)
        flag = "  OVER 227 KiB" if row["shared"] > SMEM_LIMIT else ""
        print(f"{row['name']:48s} warps {row['num_warps']} stages {row['num_stages']}: shared {row['shared']:7,d} B "
              f"({row['shared'] / 1024:5.1f} KiB), registers {row['registers']}, "
              f"spill stores {row['spill_stores']} B{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    over = [r["name"] for r in rows if r["shared"] > SMEM_LIMIT]
    if over:
        sys.exit(f"over the 227 KiB of an H100 / H200: {', '.join(over)}")


if __name__ == "__main__":
    main()
