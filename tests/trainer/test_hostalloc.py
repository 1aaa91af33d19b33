"""The trainer's malloc settings: memory a step frees is reused by the next without page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from lorafleet_trainer import hostalloc

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# In a fresh process (malloc's state is per process): ten 24 MiB blocks written, freed, then ten
# again; the minor page faults of the second round are what a step pays for memory the last one
# had already used.
PROBE = """
import ctypes, json, resource, sys
from lorafleet_trainer import hostalloc
if sys.argv[1] == "tuned":
    assert hostalloc.tune()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 24 << 20
def round_():
    blocks = [libc.malloc(size) for _ in range(10)]
    for b in blocks:
        libc.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _second_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout))


def test_freed_activations_are_reused_without_page_faults() -> None:
    pages = 10 * (24 << 20) // 4096
    # Without the settings the freed blocks go back to the kernel and fault in again...
    assert _second_round_faults("default") > pages // 2
    # ...with them the heap keeps them.
    assert _second_round_faults("tuned") < pages // 20


def test_tune_reports_that_it_applied() -> None:
    assert hostalloc.tune() is True
