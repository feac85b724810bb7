"""Interleaved timing for the benchmarks: every repeat runs each row once, in turn, so
that machine load affects all rows alike."""
import statistics
import time


def interleaved_medians(rows, repeats):
    """{name: median seconds of fn()} over ``repeats`` rounds after one warm-up round;
    ``rows``: (name, fn) pairs."""
    return {name: statistics.median(times) for name, times in interleaved_samples(rows, repeats).items()}


def interleaved_samples(rows, repeats):
    """{name: [seconds of fn() per round]} over ``repeats`` rounds after one warm-up round;
    ``rows``: (name, fn) pairs."""
    samples = {name: [] for name, _ in rows}
    for _, fn in rows:  # warm up
        fn()
    for _ in range(repeats):
        for name, fn in rows:
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples
