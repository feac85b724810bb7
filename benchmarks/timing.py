"""Interleaved timing for the benchmarks: every repeat runs each row once, in turn, so
that machine load affects all rows alike."""
import statistics
import time

#: ``--clock`` of the benchmarks: wall time, or the CPU time of the calling thread, which a
#: loaded machine does not inflate (meaningful with one intra-op thread only: with more, the
#: work of an op runs on pool threads too)
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def add_clock_argument(parser):
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the calling thread's CPU time (1 intra-op thread only: "
                             "robust to other processes on the machine)")


def interleaved_medians(rows, repeats, clock="wall"):
    """{name: median seconds of fn()} over ``repeats`` rounds after one warm-up round;
    ``rows``: (name, fn) pairs."""
    return {name: statistics.median(times) for name, times in interleaved_samples(rows, repeats, clock).items()}


def interleaved_samples(rows, repeats, clock="wall"):
    """{name: [seconds of fn() per round]} over ``repeats`` rounds after one warm-up round;
    ``rows``: (name, fn) pairs; ``clock`` a key of :data:`CLOCKS`."""
    now = CLOCKS[clock]
    samples = {name: [] for name, _ in rows}
    for _, fn in rows:  # warm up
        fn()
    for _ in range(repeats):
        for name, fn in rows:
            start = now()
            fn()
            samples[name].append(now() - start)
    return samples
