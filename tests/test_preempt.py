"""The preemption watch's signal masks, as the processes a run starts inherit them."""

import json
import subprocess
import sys

_PROBE = r"""
import json, signal, time
from multiprocessing import resource_tracker
from megatron_slkd.preempt import PreemptionWatch

def masks(pid):
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("SigBlk", "SigIgn"):
            out[key] = int(value, 16)
    return out

watch = PreemptionWatch().install()
resource_tracker.ensure_running()  # what megatron-core's checkpoint writer does later
tracker = resource_tracker._resource_tracker._pid
deadline = time.time() + 30
while not masks(tracker)["SigIgn"] & (1 << 14) and time.time() < deadline:
    time.sleep(0.01)  # until its own handlers are in
print(json.dumps({"self": masks("self"), "tracker": masks(tracker)}))
"""


def test_the_watch_blocks_both_signals_and_the_resource_tracker_survives_them():
    # CPython's resource tracker lifts the block of SIGTERM when it starts, and would die
    # of SIGUSR1 unless it inherited its block: the watch starts it while installing.
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    got = json.loads(out)
    term, usr1 = 1 << (15 - 1), 1 << (10 - 1)
    assert got["self"]["SigBlk"] & term and got["self"]["SigBlk"] & usr1, got
    assert got["tracker"]["SigBlk"] & usr1 and got["tracker"]["SigIgn"] & term, got
