"""
Re-run a benchmark with glibc told to keep and reuse freed memory.

glibc hands every freed block above its mmap threshold back to the system, so on the CPU
each large temporary (an 8192 x 1203 float32 matrix is 39 MB) costs page faults that can
outweigh the arithmetic and vary several-fold from run to run. ``bench_losses.py`` measures
in one process with glibc's defaults and one with these settings (as GPU caching allocators
keep memory) and reports both; ``bench_one_stage.py`` re-executes itself with them unless
given ``--system-malloc``.
"""
import os
import sys

REUSE_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def reexec_reusing_freed_memory():
    """Replace this process by the same command with :data:`REUSE_MEMORY` in its
    environment (a no-op when it is there already or ``--system-malloc`` was given)."""
    if "--system-malloc" in sys.argv or all(os.environ.get(k) == v for k, v in REUSE_MEMORY.items()):
        return
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **REUSE_MEMORY})
