"""resnet_fused.allocator: fault counting, and retain_freed_memory in a fresh process (it is
process-wide and one-way, so never in the pytest process itself)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from resnet_fused import allocator
from resnet_fused import benchmarking as bm

# 64 MiB: over glibc's largest mmap threshold (32 MiB), so by default every allocation of this size
# is a fresh mmap and every touch of its pages a fault
BLOCK = 64 << 20
PAGES = BLOCK // 4096

_PROBE = textwrap.dedent(f"""
    import sys
    from resnet_fused import allocator
    if sys.argv[1] == "retain":
        allocator.retain_freed_memory()
    print(allocator.malloc_policy())
    faults = []
    for _ in range(6):
        before = allocator.minor_faults()
        bytearray({BLOCK})  # allocated (malloc), touched (zero-filled), freed
        faults.append(allocator.minor_faults() - before)
    print(min(faults))
""")


def _probe(policy: str):
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def _glibc() -> bool:
    return allocator._glibc() is not None


def test_minor_faults_counts_first_touches():
    before = allocator.minor_faults()
    buf = bytearray(BLOCK)  # zero-filled: every page touched
    assert allocator.minor_faults() - before >= PAGES // 2
    del buf


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only")
def test_retain_keeps_freed_memory_and_default_faults_it_back():
    policy, faults = _probe("default")
    assert policy == "default"
    assert faults >= PAGES // 2, "by default a 64 MiB block is an mmap: its pages fault every time"
    # retained: the freed block is reused (not every time: a small allocation in between may take a
    # piece of it, and the heap grows once more, so the fewest faults of six tries are compared)
    policy, faults = _probe("retain")
    assert policy == "retain"
    assert faults < PAGES // 20, f"retained heap memory still faulted {faults} pages"


def test_retain_names_the_cause_off_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with pytest.raises(RuntimeError, match="not glibc"):
        allocator.retain_freed_memory()
    assert allocator.malloc_policy() == "default"


def test_interleaved_records_faults_per_timed_call():
    # a 64 MiB block is its own mmap under glibc's defaults (this process never retains)
    results = bm.interleaved({"touch": lambda: bytearray(BLOCK), "idle": lambda: None}, rounds=3, warmup=1)
    assert len(results["touch"].faults) == len(results["touch"].times) == 3
    assert results["idle"].median_faults < 100
    assert results["touch"].median_faults >= PAGES // 2
