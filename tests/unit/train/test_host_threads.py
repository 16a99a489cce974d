"""A GPU training process runs its host ops on one CPU thread unless the user chose (OMP_NUM_THREADS), as
torchrun's workers do; CPU training keeps torch's threads, which do the work there."""

from __future__ import annotations

import torch

from llamatron.train.distributed import host_threads_for


def test_one_thread_on_a_gpu_unless_the_user_set_omp_num_threads():
    gpu = torch.device("cuda", 0)
    assert host_threads_for(gpu, environ={}) == 1
    assert host_threads_for(gpu, environ={"OMP_NUM_THREADS": "8"}) is None


def test_cpu_training_keeps_torch_threads():
    assert host_threads_for(torch.device("cpu"), environ={}) is None
