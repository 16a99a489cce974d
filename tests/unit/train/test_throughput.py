"""Throughput windows: timed by the device's step-end events where steps have them (the host runs a step
ahead on CUDA, so its clock at a report says when the host got there, not when the GPU did the work)."""

import time

import pytest
import torch

from llamatron.train.metrics import Throughput, allocator_retries


class FakeEvent:
    """A completed CUDA event at `ms` on the device's timeline (elapsed_time as torch.cuda.Event's)."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.ms - self.ms


def test_windows_after_the_first_are_timed_between_step_end_events():
    rates = Throughput(world_size=2, flops_per_token=6e9, peak_tflops=1000.0)
    rates.add_tokens(4000)
    first = rates.report(ended=FakeEvent(5_000.0))  # no earlier event: the host's clock, start-up included
    assert first["step_time_s"] < 1.0
    rates.add_tokens(4000)
    time.sleep(0.01)  # the host's clock moves; the device's window is what counts
    second = rates.report(ended=FakeEvent(7_000.0))
    assert second["step_time_s"] == pytest.approx(2.0)
    assert second["tokens_per_s"] == pytest.approx(2000.0) and second["tokens_per_s_per_gpu"] == pytest.approx(1000.0)
    assert second["mfu"] == pytest.approx(1000.0 * 6e9 / 1e15)
    rates.add_tokens(4000)
    assert rates.report(ended=FakeEvent(8_000.0))["step_time_s"] == pytest.approx(1.0)


def test_without_events_windows_are_timed_by_the_host_clock():
    rates = Throughput(world_size=1, flops_per_token=1.0, peak_tflops=None)
    rates.add_tokens(10)
    rates.report()
    time.sleep(0.05)
    rates.add_tokens(10)
    out = rates.report()
    assert 0.04 < out["step_time_s"] < 1.0 and out["mfu"] is None


def test_allocator_retries_are_read_from_the_cuda_allocator_and_absent_on_the_cpu(monkeypatch):
    assert allocator_retries(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {"num_alloc_retries": 3, "num_ooms": 0})
    assert allocator_retries(torch.device("cuda", 0)) == 3
