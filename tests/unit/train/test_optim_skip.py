"""The optimizer step skipped on a device flag (optim.step_unless): no host sync decides it."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from llamatron.config.job import OptimSection
from llamatron.model import build_model
from llamatron.train.optim import build_optimizer, skips_on_device, step_unless
from tests.conftest import tiny_config


def _model_with_grads(seed: int = 0) -> torch.nn.Module:
    model = build_model(tiny_config(), seed=seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(tokens).float().pow(2).mean().backward()
    return model


def _state(model, optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [v.detach().clone() for v in state.values()]
    return tensors


def test_fused_adamw_skips_on_the_flag_and_steps_exactly_without_it():
    # Two identical models and optimizers (same seed, same gradients), one step each so moments exist.
    model, reference = _model_with_grads(), _model_with_grads()
    optimizer = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.1))
    reference_opt = build_optimizer(reference, OptimSection(lr=1e-2, weight_decay=0.1))
    assert skips_on_device(optimizer)
    optimizer.step()
    reference_opt.step()
    before = _state(model, optimizer)

    step_unless(optimizer, found_inf=torch.tensor(1.0))
    after = _state(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # parameters, moments, steps
    assert not hasattr(optimizer, "found_inf")  # the flag does not outlive the call

    step_unless(optimizer, found_inf=torch.tensor(0.0))
    reference_opt.step()
    for got, want in zip(_state(model, optimizer), _state(reference, reference_opt), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # bit-identical to a plain step


def test_foreach_and_offloaded_optimizers_do_not_claim_the_flag():
    from llamatron.parallel.offload import offload_optimizer

    model = _model_with_grads()
    assert not skips_on_device(build_optimizer(model, OptimSection(), fused=False))
    offloaded = offload_optimizer(build_optimizer(model, OptimSection()), mode="static", device=torch.device("cpu"))
    assert not skips_on_device(offloaded)


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_flag_reaches_the_kernel_through_fsdp_dtensor_parameters(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model(tiny_config(), seed=0)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    tokens = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens).float().pow(2).mean().backward()
    optimizer = build_optimizer(model, OptimSection(lr=1e-2))
    optimizer.step()
    before = _state(model, optimizer)
    step_unless(optimizer, found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, optimizer), strict=True))
    step_unless(optimizer, found_inf=torch.tensor(0.0))
    assert not torch.equal(before[0], _state(model, optimizer)[0])
