"""Helpers the benchmark scripts share: inputs, selection patterns, FLOP counts, timing, per-kernel
profiles, error capture.

The method (docs/benchmarking.md): fresh random inputs in the benchmark dtype, compile first, the
median of several timed runs with `jax.block_until_ready`, the dense baseline timed in the same
process; a measurement that fails (e.g. out of memory at the longest lengths) is recorded, not
raised, so one bad size does not lose the others.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line, prefixed with the seconds since the process started, flushed."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def inputs(key, shape: dict, T: int, dtype):
    """q, k, v, iq, ik for a head `shape` (msa_jax.presets.BENCH_SHAPES) at length T, standard normal.

    Drawn directly in `dtype`: a float32 draw of q alone is 34 GB at T = 1M (paper heads)."""
    B, Hq, R, D, Di = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["index_dim"]
    shapes = [(B, T, Hq, D), (B, T, R, D), (B, T, R, D), (B, T, R, Di), (B, T, Di)]
    return [jax.random.normal(k, s, dtype) for k, s in zip(jax.random.split(key, 5), shapes)]


def main_fwd_kernel(shape: dict, dtype, T: int = 8192, which: str = "fwd") -> str:
    """Which main-branch tile kernel impl="pallas" runs for a head `shape` in `dtype` on this machine:
    which="fwd", the forward's ("mosaic" on a Hopper GPU for bf16, else "triton";
    `pallas.sparse_attention.fwd_kernel_used`); which="bwd", the backward's (`bwd_kernel_used`)."""
    from pallas.sparse_attention import bwd_kernel_used, fwd_kernel_used

    B, Hq, R, D = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    q = jax.ShapeDtypeStruct((B, T, Hq, D), dtype)
    k = jax.ShapeDtypeStruct((B, T, R, D), dtype)
    idx = jax.ShapeDtypeStruct((B, T, R, shape["top_k"]), jnp.int32)
    used = fwd_kernel_used if which == "fwd" else bwd_kernel_used
    return used(q, k, idx, block_size=shape["block_size"])


def selection_union(block_idx, tile_tokens: int) -> float:
    """Mean number of distinct blocks that `tile_tokens` consecutive query tokens select (per batch row,
    KV group and tile; -1 padding not counted): the K/V blocks a query-outer tile of those tokens
    would read. top_k when neighbours select the same blocks, up to tile_tokens * top_k when they
    share none. block_idx: int [B, T, H_kv, top_k]."""
    ids = np.asarray(block_idx)
    B, T, H, K = ids.shape
    n = -(-T // tile_tokens)
    ids = np.pad(ids, ((0, 0), (0, n * tile_tokens - T), (0, 0), (0, 0)), constant_values=-1)
    ids = np.sort(ids.reshape(B, n, tile_tokens, H, K).transpose(0, 1, 3, 2, 4).reshape(B, n, H, tile_tokens * K), -1)
    first = np.concatenate([np.ones_like(ids[..., :1], bool), ids[..., 1:] != ids[..., :-1]], -1)
    return float(((ids >= 0) & first).sum(-1).mean())


def skewed_selection(key, shape: dict, T: int, hot: int):
    """block ids [B, T, H_kv, top_k] with hot blocks (the hard case for KV-outer kernels): the local
    block, the first `hot` blocks, then random visible blocks, the first top_k distinct ones in
    that priority order (-1 padding if fewer)."""
    B, R, bs, k = shape["batch"], shape["kv_heads"], shape["block_size"], shape["top_k"]
    local = jnp.broadcast_to((jnp.arange(T) // bs)[None, :, None, None], (B, T, R, 1))
    hot_ids = jnp.minimum(jnp.arange(hot)[None, None, None, :], local)
    rand = jax.random.randint(key, (B, T, R, 3 * k), 0, local + 1)
    cand = jnp.concatenate([local, hot_ids, rand], axis=-1)  # priority = position
    L = cand.shape[-1]
    srt = jnp.sort(cand * L + jnp.arange(L), axis=-1)  # by id, then priority
    ids, prio = srt // L, srt % L
    first = jnp.concatenate([jnp.ones_like(ids[..., :1], bool), ids[..., 1:] != ids[..., :-1]], axis=-1)
    order = jnp.argsort(jnp.where(first, prio, L + prio), axis=-1)[..., :k]
    picked = jnp.take_along_axis(ids, order, axis=-1)
    valid = jnp.take_along_axis(first, order, axis=-1)
    return jnp.where(valid, picked, -1).astype(jnp.int32)


def support_pairs(block_idx, block_size: int) -> float:
    """Number of (query, visible selected key) pairs per group, summed over batch and groups; the
    main branch's effective FLOPs are 4 * H_q / H_kv * D times this (causal padding not counted)."""
    T = block_idx.shape[1]
    i = jnp.arange(T)[None, :, None, None]
    n = jnp.clip(i - block_idx * block_size + 1, 0, block_size)
    return float(jnp.sum(jnp.where(block_idx >= 0, n, 0).astype(jnp.float32)))


def flop_bound(shape: dict, T: int) -> float:
    """Dense / MSA FLOP ratio at length T (docs/algorithm.md §5): the ceiling of the prefill speedup."""
    Hq, R, D, Di, bs, k = (shape[x] for x in ("heads", "kv_heads", "head_dim", "index_dim", "block_size", "top_k"))
    return (2 * Hq * D * T * T) / (R * Di * T * T + 4 * Hq * D * T * k * bs)


def cost_table(shape: dict, seq_lens, itemsize: int = 2) -> list[dict]:
    """Per length T, one prefill of a head `shape` (msa_jax.presets.BENCH_SHAPES): the FLOPs of dense
    causal attention (2 H_q D T^2) and of MSA (indexer H_kv D_idx T^2 + main branch 4 H_q D T top_k
    block_size, docs/algorithm.md §5), their ratio (`flop_bound`), and the bytes each reads and
    writes at least (q, k, v, out; MSA adds iq, ik and the int32 block ids), in units of 1e12 and 1e9."""
    B, Hq, R, D, Di, bs, k = (shape[x] for x in ("batch", "heads", "kv_heads", "head_dim", "index_dim",
                                                 "block_size", "top_k"))
    rows = []
    for T in seq_lens:
        dense = B * 2 * Hq * D * T * T
        msa = B * (R * Di * T * T + 4 * Hq * D * T * min(k, -(-T // bs)) * bs)
        io = B * T * (2 * Hq * D + 2 * R * D) * itemsize
        msa_io = io + B * T * (R * Di + Di) * itemsize + B * T * R * k * 4
        rows.append(dict(T=T, dense_tflop=dense / 1e12, msa_tflop=msa / 1e12, flop_ratio=dense / msa,
                         dense_gb=io / 1e9, msa_gb=msa_io / 1e9))
    return rows


def timeit(fn, *args, reps: int, budget: float, group: int = 1):
    """(median seconds per call, calls timed, seconds of the first call incl. compilation) of fn(*args).

    Each sample dispatches `group` calls back to back and waits once. group=1: every call is
    waited for; a larger group gives the device-side time of short ops (~0.1 ms, where one host
    round trip per call would dominate), as inside a model step that launches them without
    waiting. At most `reps` samples, fewer when they would take more than `budget` seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))  # compile + first run
    first = time.perf_counter() - t0

    def sample():
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(group)])
        return (time.perf_counter() - t0) / group

    one = sample()
    n = max(1, min(reps, int(budget / max(one * group, 1e-6))))
    times = [one] + [sample() for _ in range(n - 1)]
    return statistics.median(times), len(times) * group, first


# Events of the XLA CPU client's threads that are waits or markers, not work.
_CPU_NOT_WORK = ("end: ", "SlinkyThreadPool", "ThunkExecutor", "ThreadpoolListener")


def kernel_times(trace_events: list, calls: int = 1) -> dict:
    """Device time per call of each kernel name (ms) in a perfetto trace's events: on a GPU the
    events of its processes ("/device:GPU:0", ...: kernels and copies); with no GPU process, the
    XLA CPU client's threads (fusions, custom calls; waits and markers left out)."""
    meta = [e for e in trace_events if e.get("ph") == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    gpu = {pid for pid, name in process.items() if "GPU" in name}

    def on_device(e):
        if gpu:
            return e.get("pid") in gpu
        return (thread.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLAPjRtCpuClient")
                and not e["name"].startswith(_CPU_NOT_WORK))

    times = collections.defaultdict(float)
    for e in trace_events:
        if "dur" in e and on_device(e):
            times[e["name"]] += e["dur"] / 1e3 / calls  # µs -> ms
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def kernel_profile(fn, *args, calls: int = 2) -> dict:
    """{kernel name: ms per call}, largest first, of fn(*args) (compiled and run once first), from a
    `jax.profiler` trace of `calls` calls (`kernel_times`). The sum is the device's busy time per
    call; next to the wall time it says how much is launch gaps or host work."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    return kernel_times(trace["traceEvents"] if isinstance(trace, dict) else trace, calls)


def top_kernels(times: dict, n: int = 8, width: int = 70) -> str:
    """The n largest entries of a `kernel_profile` as lines "  ms  name", then the rest's sum."""
    items = list(times.items())
    lines = [f"  {ms:9.3f}  {name[:width]}" for name, ms in items[:n]]
    rest = sum(ms for _, ms in items[n:])
    if rest:
        lines.append(f"  {rest:9.3f}  ({len(items) - n} more)")
    return "\n".join(lines)


PROFILE_TOP = 25  # kernels per stage that `profile_stages` keeps


def profile_stages(stages: dict, label: str = "") -> dict:
    """{stage: {kernel: ms per call}} (the PROFILE_TOP largest) of each stage = (fn, args), as the
    benchmarks' --profile keeps it; each stage's kernels are logged as it is traced."""
    out = {}
    for stage, (fn, args) in stages.items():
        times = kernel_profile(fn, *args)
        out[stage] = dict(list(times.items())[:PROFILE_TOP])
        log(f"{label}{stage}: kernels, ms per call (sum {sum(times.values()):.3f})\n{top_kernels(times)}")
    return out


def peak_memory_bytes(devices=None) -> int | None:
    """The largest peak of memory in use (bytes) over `devices` (default: this process's), from the
    runtime allocator's statistics; None where the backend keeps none (the CPU)."""
    peaks = [stats["peak_bytes_in_use"] for d in (jax.local_devices() if devices is None else devices)
             if (stats := d.memory_stats()) and "peak_bytes_in_use" in stats]
    return int(max(peaks)) if peaks else None


def copy_bandwidth(n_bytes: int = 1 << 32) -> float:
    """Bytes/s of a device copy (read + write) of an n_bytes float32 array: the card's practical ceiling."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    t, _, _ = timeit(jax.jit(lambda a: a + 1.0), x, reps=10, budget=5.0)
    return 2 * x.nbytes / t


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n^3 bf16 matmul with float32 accumulation: the card's practical dense rate."""
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(1)))
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t, _, _ = timeit(mm, a, b, reps=10, budget=5.0)
    return 2 * n**3 / t


def card_rates() -> dict:
    """The denominators of the benchmarks' floors, measured: copy GB/s and bf16 matmul TFLOP/s (small
    sizes off a GPU, where they only keep the code path exercised)."""
    gpu = jax.default_backend() == "gpu"
    return dict(copy_gb_s=copy_bandwidth(1 << 32 if gpu else 1 << 24) / 1e9,
                matmul_tflops=matmul_rate(8192 if gpu else 512) / 1e12)


def floor_ms(flops: float, n_bytes: float, rates: dict) -> dict:
    """The time a stage cannot beat on the card: its FLOPs at the measured matmul rate or its bytes
    at the measured copy bandwidth, whichever is longer (`card_rates`)."""
    t_flop = flops / (rates["matmul_tflops"] * 1e12) * 1e3
    t_byte = n_bytes / (rates["copy_gb_s"] * 1e9) * 1e3
    return dict(floor_ms=max(t_flop, t_byte), flop_ms=t_flop, byte_ms=t_byte, bound="flops" if t_flop >= t_byte else "bytes")


def stage_floors(shape: dict, T: int, pairs: float, rates: dict, itemsize: int, train: bool = False) -> dict:
    """Floors (`floor_ms`) of the attention stages at length T for a head `shape`; pairs =
    `support_pairs` of the selection (summed over batch and groups). The FLOPs are the useful ones
    (docs/benchmarking.md); the bytes are each stage's inputs read once and outputs written once:
      dense    causal attention: 2 H_q D T^2 FLOPs; q, k, v in, out out.
      indexer  H_kv D_idx T^2; iq, ik in, the block ids out.
      main     4 H_q / H_kv D per selected (query, key) pair; q, k, v in, out out.
    train=True: fwd+bwd (3.5x the forward's FLOPs; q, k, v, out, dout in, dq, dk, dv out) and the
      KL: the teacher's scores once (2 D per pair and head) and the student's three dots (z, d iq,
      d ik: 6 D_idx per pair); q, k, iq, ik in, d iq, d ik out."""
    B, Hq, R, D, Di, k = (shape[x] for x in ("batch", "heads", "kv_heads", "head_dim", "index_dim", "top_k"))
    G = Hq // R
    s = itemsize
    q_b, kv_b, iq_b, ik_b = B * T * Hq * D * s, 2 * B * T * R * D * s, B * T * R * Di * s, B * T * Di * s
    ids_b = B * T * R * k * 4
    f_dense = B * 2 * Hq * D * T * T
    f_main = 4 * G * D * pairs
    f = 3.5 if train else 1.0
    io = (3 * q_b + 2 * kv_b) if train else (2 * q_b + kv_b)  # (q, out, dout, dq) + (k, v, dk, dv) / q, out, k, v
    out = dict(dense=floor_ms(f * f_dense, io, rates),
               indexer=floor_ms(B * R * Di * T * T, iq_b + ik_b + ids_b, rates),
               main=floor_ms(f * f_main, io + ids_b, rates))
    if train:
        out["kl"] = floor_ms(2 * G * D * pairs + 6 * Di * pairs, q_b + kv_b / 2 + 2 * (iq_b + ik_b) + ids_b, rates)
    return out


def is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()


def guarded(what: str, fn) -> dict:
    """fn() -> dict; an exception becomes {"status": "oom" | "error", "error": ...} (logged), never raised."""
    try:
        res = fn()
        res.setdefault("status", "ok")
        return res
    except Exception as e:  # noqa: BLE001 - record and go on
        status = "oom" if is_oom(e) else "error"
        res = dict(status=status, error=f"{type(e).__name__}: {str(e)[:300]}")
        log(f"{what}: {status.upper()} {res['error'][:200]}")
        return res


def fmt(x, width: int = 8) -> str:
    """3 significant digits, fixed width (CPU TFLOP/s are ~1e-3, GPU ones ~1e2); strings as they are."""
    if x is None:
        return f"{'-':>{width}}"
    if isinstance(x, str):
        return f"{x:>{width}}"
    return f"{x:>{width}.3g}"


def cell(m: dict, key: str = "ms"):
    """m[key] of a guarded measurement, or its status ("oom", "error", ...)."""
    return m.get(key) if m.get("status") == "ok" else m.get("status", "-")
