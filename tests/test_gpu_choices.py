"""The choices ekdc makes on a GPU machine, checked here without one (the GPU calls are stood in for): they
are never executed on the CPU machines the suite runs on, and are wrong silently when wrong."""
import pytest
import torch

from ekdc import UserError
from ekdc.contract import ort_providers
from ekdc.training import runtime


def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(monkeypatch):
    """T4 or V100 emulate bf16 (far slower): there auto is fp16 with a GradScaler; on Ampere and later, bf16."""
    for hardware, want in ((False, torch.float16), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, hw=hardware: hw or including_emulation)
        assert runtime._autocast_dtype("auto", use_cuda=True) is want


def test_torchrun_with_one_named_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="names one GPU, but torchrun started 2 processes"):
        runtime.setup_runtime("cuda:1", "auto", False)


def test_onnx_runtime_runs_on_the_processs_own_gpu():
    assert ort_providers("cuda", device_id=3)[0] == ("CUDAExecutionProvider", {"device_id": 3})
    assert ort_providers("tensorrt", {"a": 1}, device_id=2)[0] == ("TensorrtExecutionProvider", {"device_id": 2, "a": 1})


def test_qad_fine_tunes_on_a_gpu_this_machine_has(monkeypatch):
    """A run trained on cuda:3 exported where one GPU is: QAD takes cuda:0, not an error."""
    from types import SimpleNamespace

    from ekdc.deploy.qad import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _device(SimpleNamespace(device="cuda:3")) == torch.device("cuda:0")
    assert _device(SimpleNamespace(device="cuda:0")) == torch.device("cuda:0")
    assert _device(SimpleNamespace(device="cpu")) == torch.device("cpu")


def test_a_process_group_outlives_rank_0_working_alone(monkeypatch):
    """Rank 0 plans a student or builds the teacher cache while the others wait: NCCL's 10-minute default
    watchdog would abort them; the group is joined with hours."""
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    runtime.setup_runtime("cpu", "fp32", False)
    assert joined["backend"] == "gloo" and joined["timeout"].total_seconds() >= 3 * 3600
