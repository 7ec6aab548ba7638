"""Per-job peak memory (issue 19): the peak a job reports is its own, not the worker process's lifetime peak."""

import resource

from worker.telemetry import MIB, PeakMemorySampler

BIG = 300 * MIB


def test_peak_memory_restarts_with_each_job() -> None:
    sampler = PeakMemorySampler(interval=0.01)
    # given: a first "job" that held 300 MiB more than the process holds now
    sampler.start()
    ballast = bytearray(BIG)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it is resident
    first_peak = sampler.peak_mb()
    del ballast
    sampler.stop()
    # when: the next job starts on the same worker process
    sampler.start()
    second_peak = sampler.peak_mb()
    sampler.stop()
    # then: the first job saw its ballast, the second does not inherit it, though the process's peak still does
    assert first_peak - second_peak > 200
    lifetime_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert lifetime_peak_mb - second_peak > 200
