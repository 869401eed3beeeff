"""Process setup shared by the services: glibc keeps freed model buffers for the next round."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from sagmq.runtime.lifecycle import keep_freed_memory
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
buf = bytearray(256 * 2**20)  # a model-sized buffer, touched, then freed
before = rss_mb()
del buf
print(applied, round(before - rss_mb()))
"""


def freed_mb(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, freed = out.split()
    return applied, int(freed)


def test_large_freed_buffers_stay_with_the_process_for_reuse() -> None:
    applied, kept_freed = freed_mb("keep")
    assert applied == "True"
    assert kept_freed < 16  # the 256 MB stay mapped: the next round reuses them without page faults


def test_without_it_glibc_hands_them_back() -> None:
    applied, freed = freed_mb("default")
    assert applied == "None"
    assert freed > 200  # what the test above would see if mallopt had not been applied
