"""bench_prefill.py with the Mosaic GPU forward's pingpong schedule as the default (MGPUConfig(pingpong=True)),
for one measurement before the default changes in the library. Usage: python3 _gpu/prefill_pingpong.py ARGS..."""
import dataclasses, runpy, sys
import pallas.mgpu_sparse_attention as mg

_orig = mg.MGPUConfig
@dataclasses.dataclass(frozen=True)
class PingpongConfig(_orig):
    pingpong: bool = True
mg.MGPUConfig = PingpongConfig
sys.argv = ["experiments/bench_prefill.py"] + sys.argv[1:]
runpy.run_path("experiments/bench_prefill.py", run_name="__main__")
