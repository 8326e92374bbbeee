"""common.memory: freed memory is kept for the next batch (no page faults), and the user's choice wins."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate, touch and free a 48 MB block twice; report how much of it the process still holds after the
# free (resident memory, from /proc: page-fault counts would depend on transparent huge pages).
PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
import numpy as np
from common.memory import retain_freed_memory
active = retain_freed_memory() if {call} else False
def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
start = resident()
for _ in range(2):
    block = np.empty(48 * 2**20, dtype=np.uint8)
    block.fill(1)
    del block
print(json.dumps({{"active": active, "held": resident() - start}}))
"""


def run_python(code, **env):
    """Run `code` in a fresh interpreter with no allocator setting inherited, plus `env`; return its stdout."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "HUDD_RETAIN_MEMORY"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          check=True).stdout


def probe(call=True, **env):
    out = run_python(PROBE.format(root=str(ROOT), call=call), **env)
    return json.loads(out.strip().splitlines()[-1])


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                           reason="the setting applies to glibc only")


@glibc
def test_freed_memory_is_kept_for_the_next_batch():
    block = 48 * 2**20
    assert probe(call=False)["held"] < block // 4, "glibc's default returns a freed 48 MB block to the system"
    kept = probe()
    assert kept["active"]
    assert kept["held"] > block * 3 // 4, "with the setting the process keeps it, so the next batch reuses it"


@glibc
@pytest.mark.parametrize("env", [{"HUDD_RETAIN_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_user_choice_wins(env):
    assert not probe(**env)["active"]


@glibc
def test_engine_sets_it_on_first_use():
    code = ("import sys; sys.path.insert(0, %r); import torch, heatmapModule, common.memory as m; "
            "before = m.retaining(); heatmapModule.layer_relevance(torch.nn.Sequential(torch.nn.Linear(4, 2)), "
            "torch.ones(1, 4)); print(before, m.retaining())" % str(ROOT))
    assert run_python(code).split() == ["False", "True"]
