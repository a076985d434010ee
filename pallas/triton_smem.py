"""Shared memory, registers and spills of the Triton-Pallas kernels, measured on a CPU (no GPU).

A Triton-lowered kernel whose tiles need more shared memory than the GPU has (227 KiB on an H100 /
H200) lowers and compiles into the program and fails only when it launches: "Shared memory size limit
exceeded: requested N". This module finds such a kernel on a CPU: it lowers a function for an abstract
H100 (sm_90), captures the Triton IR of each Triton-Pallas kernel it launches, compiles that IR with the
`triton` package for sm_90, and reads the kernel's shared memory (Triton's allocation, the number the
launch checks) and ptxas's registers and spill stores.

    rows = measure(fn, *abstract_args)        # [{name, num_warps, num_stages, shared, registers, spill_stores}]
    rows = layer_kernels(heads=12, kv_heads=4, head_dim=64, index_dim=64, block_size=256, top_k=8)

Needs the `triton` package (the dev extra pins 3.9.0: it reproduces both numbers seen on an H200 with
jax 0.11.2, 233,472 B for a kernel whose launch failed and 229,376 B for one that ran; 3.5.1 and 3.7.1
put the second at 262,144 B). The Mosaic GPU kernels are not Triton: their own lowering checks their
shared memory (tests/test_mgpu_*.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering as triton_lowering

SMEM_LIMIT = 227 * 1024  # H100 / H200 shared memory per block


def lower_for_h100(fn, *args) -> tuple[str, list[str]]:
    """(the module jit(fn) lowers to for an abstract H100, the Triton IR of each Triton-Pallas kernel as
    text, in launch order)."""
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
    """[{name, num_warps, num_stages, ttir}] of the Triton kernels jit(fn) launches, each name once."""
    text, irs = lower_for_h100(fn, *args)
    cfgs = re.findall(r'name = "([^"]*)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    if len(cfgs) != len(irs):
        raise RuntimeError(f"{len(cfgs)} kernel launches but {len(irs)} Triton modules: the lowering changed")
    out = {}
    for (name, stages, warps), ir in zip(cfgs, irs):
        out.setdefault(name, dict(name=name, num_stages=int(stages), num_warps=int(warps), ttir=ir))
    return list(out.values())


def compile_sm90(kernel: dict) -> dict:
    """Compile one `kernels` entry for sm_90: {shared (bytes), registers, spill_stores (bytes)}."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns without it (no effect here)
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
    return dict(shared=int(k.metadata.shared), registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spills.group(1)) if spills else None)


def measure(fn, *args, skip=()) -> list[dict]:
    """Every Triton kernel jit(fn) launches on an H100 / H200 (but those named in `skip`), compiled for
    sm_90: name, num_warps, num_stages, shared, registers, spill_stores."""
    return [dict({k: v for k, v in kern.items() if k != "ttir"}, **compile_sm90(kern))
            for kern in kernels(fn, *args) if kern["name"] not in skip]


def layer_kernels(*, heads: int, kv_heads: int, head_dim: int, index_dim: int, block_size: int, top_k: int,
                  seq_len: int = 4096, dtype=jnp.bfloat16) -> tuple[list[dict], list[str]]:
    """(`measure` rows, refusals) for the Triton kernels of one MSA layer at these sizes, with the settings
    they resolve by default: the index top-k, the sparse main branch forward and backward (Triton, as
    every GPU runs it; Hopper runs Mosaic GPU ones where they apply), the sparse KL value and gradients,
    the KL forward, the fused main + KL backward (`ops.sparse_attention_and_index_kl`) and the dense
    warmup's full-support KL. refusals: the kernel families that refuse these sizes (their ValueError)."""
    from pallas import index_kl, index_kl_full, index_topk
    from pallas import sparse_attention as main_branch

    B, T, H, R, D, Di, bs = 1, seq_len, heads, kv_heads, head_dim, index_dim, block_size
    top_k = min(top_k, -(-T // bs))
    S = jax.ShapeDtypeStruct
    q, k = S((B, T, H, D), dtype), S((B, T, R, D), dtype)
    iq, ik = S((B, T, R, Di), dtype), S((B, T, Di), dtype)
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

    def fused_step(q, k, v, iq, ik, ids, w):  # the KL's gradient inside the main backward
        def loss(q, k, v, iq, ik):
            out = index_kl.sparse_attention_with_kl_grad(q, k, v, iq, ik, ids, w, block_size=bs, interpret=False)
            return sum(x.astype(jnp.float32).sum() for x in jax.tree.leaves(out) if x.dtype != jnp.int32)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, iq, ik)

    def warmup_step(q, k, iq, ik, w):  # the dense warmup's KL over the full causal support
        return jax.grad(lambda iq, ik: index_kl_full.index_kl_full_sum(q, k, iq, ik, w, interpret=False).sum(),
                        argnums=(0, 1))(iq, ik)

    rows, refused = [], []
    for label, fn, args in (("sparse step", sparse_step, (q, k, k, iq, ik, ids, lse, w)),
                            ("fused main + KL backward", fused_step, (q, k, k, iq, ik, ids, w)),
                            ("dense warmup KL", warmup_step, (q, k, iq, ik, w))):
        try:
            rows += measure(fn, *args, skip={r["name"] for r in rows})  # kernels shared by the steps: once
        except ValueError as e:  # a kernel's own limits (e.g. a block its backward does not take)
            refused.append(f"{label}: {e}")
    return rows, refused
