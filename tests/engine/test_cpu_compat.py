"""The CPU compatibility layer: each patched spot does what its docstring says."""

import pytest
import torch

from hcx.engine import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive with CUDA")


def test_enable_is_idempotent_and_active():
    assert cpu_compat.enable() is True
    assert cpu_compat.enable() is True
    assert cpu_compat.is_active()


def test_cuda_device_arguments_become_cpu():
    cpu_compat.enable()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu" and t.to(device="cuda:0").device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()  # no error


def test_type_strings_report_cuda_names():
    cpu_compat.enable()
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions untouched


def test_rng_tracker_forks_cpu_generator_and_restores_it():
    from megatron.core import tensor_parallel

    from hcx.engine import parallel
    from hcx.config import ParallelConfig

    parallel.initialize(ParallelConfig(), seed=7)
    try:
        tracker = tensor_parallel.get_cuda_rng_tracker()
        torch.manual_seed(0)
        expected_outer = torch.rand(3)
        torch.manual_seed(0)
        with tracker.fork():
            inside = torch.rand(3)
        outer = torch.rand(3)
        assert torch.equal(outer, expected_outer)  # the default stream is restored
        assert not torch.equal(inside, expected_outer)  # the fork has its own stream
        with tracker.fork():
            again = torch.rand(3)
        assert not torch.equal(again, inside)  # and it advances
    finally:
        parallel.shutdown()
