"""msa_jax.bench: the helpers the benchmark scripts share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax import bench
from msa_jax.presets import BENCH_SHAPES


def test_measurement_errors_are_recorded_not_raised():
    def oom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes")

    assert bench.guarded("x", oom)["status"] == "oom"
    assert bench.guarded("x", lambda: 1 / 0)["status"] == "error"
    assert bench.guarded("x", lambda: dict(ms=1.0)) == dict(ms=1.0, status="ok")
    assert bench.cell(dict(status="oom")) == "oom" and bench.cell(dict(status="ok", ms=2.0)) == 2.0


def test_skewed_selection_is_valid_and_hot():
    shape = dict(BENCH_SHAPES["cpu"], batch=2)
    T, bs, k = 200, shape["block_size"], shape["top_k"]
    ids = np.asarray(bench.skewed_selection(jax.random.key(0), shape, T, hot=2))
    assert ids.shape == (2, T, shape["kv_heads"], k)
    local = np.arange(T) // bs
    for b in range(2):
        for i in range(T):
            row = ids[b, i, 0]
            valid = row[row >= 0]
            assert len(set(valid)) == len(valid) and local[i] in valid and (valid <= local[i]).all()
            assert set(range(min(2, local[i] + 1))) <= set(valid)  # the hot blocks, when visible
            assert (row[len(valid):] == -1).all()


def test_support_pairs_counts_visible_keys():
    bs = 4
    ids = jnp.array([[[[0, -1]], [[0, 1]], [[1, 0]]]], jnp.int32)[:, :, :, :]  # [1, 3, 1, 2]
    # token 0: block 0 -> 1 key; token 1: blocks 0, 1 -> 2 + 0 keys; token 2: 3 + 0 keys
    assert bench.support_pairs(ids, bs) == 1 + 2 + 3
    paper = BENCH_SHAPES["paper"]
    assert abs(bench.flop_bound(paper, 131072) - 16.0) < 1e-9  # docs/algorithm.md §5: 32 N / (N + 131072)


def test_main_fwd_kernel_names_the_tile_kernel_of_this_machine():
    from pallas import mgpu_sparse_attention as mg

    want = "mosaic" if mg.on_hopper() else "triton"
    assert bench.main_fwd_kernel(BENCH_SHAPES["paper"], jnp.bfloat16) == want
    assert bench.main_fwd_kernel(BENCH_SHAPES["paper"], jnp.float32) == "triton"  # float32 stays on Triton


def test_selection_union_counts_distinct_blocks_per_tile():
    T, K = 10, 3
    same = np.broadcast_to(np.array([0, 2, 5]), (2, T, 1, K))  # every token the same blocks
    assert bench.selection_union(same, 4) == 3.0
    disjoint = np.arange(T * K).reshape(1, T, 1, K)  # no two tokens share a block
    # tiles of 4, 4 and 2 tokens (the last one padded with -1, not counted)
    assert bench.selection_union(disjoint, 4) == (12 + 12 + 6) / 3
    padded = np.array(disjoint)
    padded[..., 2] = -1
    assert bench.selection_union(padded, 5) == 10.0


def test_kernel_times_sums_device_events_per_name():
    meta = lambda pid, tid, what, name: dict(ph="M", pid=pid, tid=tid, name=what, args=dict(name=name))  # noqa: E731
    gpu_trace = [
        meta(1, 0, "process_name", "/host:CPU"), meta(1, 5, "thread_name", "python"),
        meta(2, 0, "process_name", "/device:GPU:0"), meta(2, 7, "thread_name", "Stream #13"),
        dict(ph="X", pid=2, tid=7, name="msa_tile", dur=3000.0), dict(ph="X", pid=2, tid=7, name="msa_tile", dur=1000.0),
        dict(ph="X", pid=2, tid=7, name="combine", dur=5000.0),
        dict(ph="X", pid=1, tid=5, name="PjitFunction", dur=9e6),  # host work: not a kernel
    ]
    assert bench.kernel_times(gpu_trace, calls=2) == {"combine": 2.5, "msa_tile": 2.0}
    assert list(bench.kernel_times(gpu_trace)) == ["combine", "msa_tile"]  # largest first
    cpu_trace = [  # no GPU process: the XLA CPU client's threads, without its waits and markers
        meta(1, 0, "process_name", "/host:CPU"), meta(1, 5, "thread_name", "python"),
        meta(1, 6, "thread_name", "tf_XLAPjRtCpuClient/123"),
        dict(ph="X", pid=1, tid=6, name="dot_fusion", dur=400.0),
        dict(ph="X", pid=1, tid=6, name="SlinkyThreadPool::Await", dur=900.0),
        dict(ph="X", pid=1, tid=6, name="end: dot_fusion", dur=1.0),
        dict(ph="X", pid=1, tid=5, name="PjitFunction", dur=9e6),
    ]
    assert bench.kernel_times(cpu_trace) == {"dot_fusion": 0.4}


def test_kernel_profile_traces_the_compiled_function():
    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(0))
    a = jax.random.normal(jax.random.key(0), (256, 256))
    times = bench.kernel_profile(f, a, a, calls=2)
    assert times and all(ms > 0 for ms in times.values())
    assert list(times.values()) == sorted(times.values(), reverse=True)
    text = bench.top_kernels(times, n=1)
    assert text.splitlines()[0].strip().endswith(next(iter(times))[:70])
    stages = bench.profile_stages(dict(mm=(f, (a, a)), neg=(jax.jit(lambda x: -x), (a,))))
    assert list(stages) == ["mm", "neg"] and all(0 < len(t) <= bench.PROFILE_TOP for t in stages.values())


def test_peak_memory_is_the_largest_device_peak_and_none_without_statistics():
    class Dev:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    devs = [Dev({"peak_bytes_in_use": 3 << 30, "bytes_in_use": 1}), Dev(None), Dev({"peak_bytes_in_use": 5 << 30})]
    assert bench.peak_memory_bytes(devs) == 5 << 30
    assert bench.peak_memory_bytes([Dev(None), Dev({"bytes_in_use": 7})]) is None
    x = jnp.ones((512, 512), jnp.float32).block_until_ready()  # something allocated (a fresh GPU process: 0)
    mine = bench.peak_memory_bytes()  # this process's devices: the CPU keeps no allocator statistics
    assert mine is None if jax.default_backend() == "cpu" else mine >= x.nbytes
