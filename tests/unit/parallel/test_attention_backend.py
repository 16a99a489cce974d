"""The attention-backend knob (parallel/attention_backend.py) on CPU, where PyTorch has two SDPA kernels:
its CPU flash kernel and the math path.

- The seed's FL maps to backend orders (true: flash first; false: flash left out, cuDNN first); on CUDA
  auto moves the fastest timed kernel to the front (the ordering rule is tested here, the timing on GPUs).
- The probe names the kernel that actually ran (read from the aten ops), for causal and packed shapes.
- A named backend that cannot run is refused with the ones that can; PyTorch's flags are restored.
- The core decides what the model runs, eager and in compiled blocks (the choice is traced with the call):
  under `math` the model's forward calls no fused kernel and its loss equals the CPU flash kernel's within
  1e-5 relative (fp32; measured ~1e-7).
- The config accepts the seed's FL=true/false and every backend name, and refuses FL=false with flash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llamatron.config.job import JobConfig
from llamatron.config.load import apply_overrides
from llamatron.errors import LlamatronError
from llamatron.model import build_model
from llamatron.parallel.attention_backend import (
    AttentionBackend,
    AttentionShape,
    agree_across_ranks,
    backend_order,
    fastest_first,
    sdpa_ops,
    select_attention_backend,
)
from llamatron.parallel.compile import apply_compile
from tests.conftest import subprocess_env, tiny_config

REPO = Path(__file__).resolve().parents[3]
CPU = torch.device("cpu")
SHAPE = AttentionShape(batch=2, heads=4, kv_heads=2, seq=24, head_dim=16, packed=False)
PACKED = AttentionShape(batch=2, heads=4, kv_heads=2, seq=24, head_dim=16, packed=True)


def test_seed_fl_maps_to_backend_orders():
    assert backend_order("auto", prefer_flash=True) == ["flash", "efficient", "math", "cudnn"]
    assert backend_order("auto", prefer_flash=False) == ["cudnn", "efficient", "math"]
    assert backend_order("cudnn", prefer_flash=True) == ["cudnn"]
    with pytest.raises(LlamatronError, match="'fa3' is not one of auto, flash, cudnn, efficient, math"):
        backend_order("fa3")


def test_auto_puts_the_fastest_timed_kernel_first_and_ties_keep_the_order():
    order = ["flash", "efficient", "math", "cudnn"]
    assert fastest_first(order, {"flash": 4.1e-3, "cudnn": 2.5e-3}) == ["cudnn", "flash", "efficient", "math"]
    # Within 5% of the fastest counts as tied: the earlier kernel stays first, so noise cannot flip it.
    assert fastest_first(order, {"flash": 2.6e-3, "cudnn": 2.5e-3}) == order
    assert fastest_first(order, {}) == order  # nothing timed (CPU): the order as configured


@pytest.mark.parametrize("shape", [SHAPE, PACKED], ids=["causal", "packed"])
@pytest.mark.parametrize(("choice", "prefer_flash", "ran"), [
    ("auto", True, "flash (CPU kernel)"), ("auto", False, "math"), ("flash", True, "flash (CPU kernel)"),
    ("math", True, "math"),
])
def test_probe_reports_the_kernel_that_ran(shape, choice, prefer_flash, ran):
    backend = select_attention_backend(choice, prefer_flash=prefer_flash, shape=shape, device=CPU,
                                       dtype=torch.float32)
    assert backend.ran == ran
    text = backend.describe()
    assert text.startswith(f"attention backend: {ran} (parallel.attention_backend={choice}")
    assert "seq 24" in text and ("document mask" if shape.packed else "causal") in text


@pytest.mark.parametrize("choice", ["efficient", "cudnn"])
def test_a_backend_that_cannot_run_is_refused_naming_those_that_can(choice):
    before = (torch._C._get_sdp_priority_order(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.math_sdp_enabled())
    with pytest.raises(LlamatronError, match=rf"attention_backend={choice} cannot run .* on cpu .*"
                                             r"backends that can: flash, math \(or auto\)"):
        select_attention_backend(choice, prefer_flash=True, shape=SHAPE, device=CPU, dtype=torch.bfloat16)
    after = (torch._C._get_sdp_priority_order(), torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled())
    assert after == before


def _model_loss(model, choice: str, *, compiled: bool = False) -> tuple[torch.Tensor, list[str]]:
    tokens = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(0))
    backend = select_attention_backend(choice, prefer_flash=True, shape=SHAPE, device=CPU, dtype=torch.float32,
                                       compiled=compiled)
    model.set_attention_core(backend.core())
    apply_compile(model, enabled=compiled, backend="aot_eager")
    if compiled:
        model(tokens[:, :-1])  # traced here: the profiled call runs the compiled blocks only
    logits = []
    ops = sdpa_ops(lambda: logits.append(model(tokens[:, :-1])))
    loss = F.cross_entropy(logits[0].flatten(0, 1), tokens[:, 1:].flatten())
    return loss, ops


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_core_decides_what_the_model_runs(compiled):
    flash_loss, flash_ops = _model_loss(build_model(tiny_config(), seed=3), "flash", compiled=compiled)
    math_loss, math_ops = _model_loss(build_model(tiny_config(), seed=3), "math", compiled=compiled)
    assert flash_ops.count("_scaled_dot_product_flash_attention_for_cpu") == 2  # one per block
    assert not any(kernel in op for op in math_ops for kernel in ("flash", "cudnn", "efficient")), math_ops
    torch.testing.assert_close(math_loss, flash_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("choice", "ran"), [("flash", "flash (CPU kernel)"), ("math", "math")])
def test_the_probe_reports_what_a_compiled_call_runs(choice, ran):
    backend = select_attention_backend(choice, prefer_flash=True, shape=SHAPE, device=CPU, dtype=torch.float32,
                                       compiled=True)
    assert backend.ran == ran


def test_config_takes_the_seed_fl_and_backend_names():
    assert apply_overrides(JobConfig(), ["--parallel.flash_attention=false"]).parallel.flash_attention is False
    config = apply_overrides(JobConfig(), ["--parallel.attention_backend=cudnn"])
    assert config.parallel.attention_backend == "cudnn"
    with pytest.raises(LlamatronError, match="parallel.attention_backend: 'fa3' is not one of"):
        apply_overrides(JobConfig(), ["--parallel.attention_backend=fa3"])
    config = apply_overrides(JobConfig(), ["--parallel.flash_attention=false", "--parallel.attention_backend=flash"])
    assert any("contradicts" in p for p in config.problems())


def test_every_rank_runs_rank_0s_timed_choice():
    """Two gloo ranks whose own timings disagree (a close call) end with rank 0's kernel first."""
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("agreed on cudnn") == 2, proc.stdout


def _agree_on_two_ranks() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Rank 0 timed cuDNN fastest, rank 1 flash: each probe put its own winner first.
    seconds = (("cudnn", 2.5e-3), ("flash", 2.6e-3)) if rank == 0 else (("flash", 2.4e-3), ("cudnn", 2.6e-3))
    order = tuple(name for name, _ in seconds) + ("efficient", "math")
    backend = AttentionBackend(choice="auto", order=order, ran=order[0], shape=SHAPE, dtype=torch.bfloat16,
                               seconds=seconds)
    agreed = agree_across_ranks(backend, device=CPU)
    assert agreed.order == ("cudnn", "flash", "efficient", "math") and agreed.ran == "cudnn", agreed
    assert agreed.core().backends[0] == torch.nn.attention.SDPBackend.CUDNN_ATTENTION
    print(f"rank {rank} agreed on {agreed.ran}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _agree_on_two_ranks()
