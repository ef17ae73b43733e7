"""TensorRT runner: the sidecar metadata check, lazy imports, and the load/infer plumbing
against a stand-in for the tensorrt and cuda-python modules (the real ones need an NVIDIA GPU;
tests/export/test_tensorrt_gpu.py runs them for real where one is present)."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from serve.backends import tensorrt as trt_backend
from serve.backends.tensorrt import DeviceInfo, EngineMetadata, TensorRTRunner
from serve.errors import EngineMismatchError, InvalidInputError, MissingDependencyError, ModelLoadError
from serve.repository import TensorSpec

SPEC_IN = TensorSpec("images", np.uint8, (4, 4, 3))
SPEC_OUT = TensorSpec("probabilities", np.float32, (3,))


def metadata(**changes) -> EngineMetadata:
    values = dict(tensorrt_version="10.3.0", gpu_name="NVIDIA A10", compute_capability="8.6", precision="fp16",
                  input_name="images", output_name="probabilities", image_size=(4, 4),
                  profile={"min": 1, "opt": 2, "max": 4},
                  rebuild_command="python -m export.optimize m --repository models --precision fp16 --engine-only --force")
    values.update(changes)
    return EngineMetadata(**values)


def test_metadata_round_trip(tmp_path):
    plan = tmp_path / "model.plan"
    path = trt_backend.write_metadata(plan, metadata())
    assert path.name == "model.plan.json"
    assert json.loads(path.read_text())["compute_capability"] == "8.6"
    assert trt_backend.read_metadata(plan) == metadata()


def test_missing_or_broken_sidecar_is_a_load_error(tmp_path):
    plan = tmp_path / "model.plan"
    with pytest.raises(ModelLoadError, match="model.plan.json is missing"):
        trt_backend.read_metadata(plan)
    trt_backend.sidecar_path(plan).write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read engine metadata"):
        trt_backend.read_metadata(plan)
    trt_backend.sidecar_path(plan).write_text(json.dumps({"precision": "fp16"}))
    with pytest.raises(ModelLoadError, match="missing fields"):
        trt_backend.read_metadata(plan)


def test_same_device_passes():
    assert trt_backend.check_compatible(metadata(), DeviceInfo("10.3.0.26", "NVIDIA A10", "8.6")) == []


def test_other_tensorrt_version_names_both_sides_and_the_rebuild_command():
    with pytest.raises(EngineMismatchError) as info:
        trt_backend.check_compatible(metadata(), DeviceInfo("10.4.0", "NVIDIA A10", "8.6"), model="m",
                                     plan="models/m_trt_fp16/1/model.plan")
    message = str(info.value)
    assert "built for TensorRT 10.3.0 on NVIDIA A10 (compute capability 8.6)" in message
    assert "this machine has TensorRT 10.4.0" in message
    assert "python -m export.optimize m --repository models --precision fp16 --engine-only --force" in message


def test_other_gpu_family_is_a_mismatch():
    with pytest.raises(EngineMismatchError, match=r"compute capability 8.6 \(this machine's GPU has 9.0\)"):
        trt_backend.check_compatible(metadata(), DeviceInfo("10.3.0", "NVIDIA H100", "9.0"))


def test_same_family_other_gpu_only_warns():
    warnings = trt_backend.check_compatible(metadata(), DeviceInfo("10.3.0", "NVIDIA A10G", "8.6"))
    assert len(warnings) == 1 and "NVIDIA A10" in warnings[0] and "NVIDIA A10G" in warnings[0]


def test_version_comparison():
    assert trt_backend.same_version("10.3.0", "10.3.0.26")
    assert not trt_backend.same_version("10.3.0", "10.3.1")
    assert not trt_backend.same_version("", "10.3.0")


def test_importing_the_backend_imports_no_gpu_package():
    code = ("import sys, serve.backends.tensorrt, export.tensorrt; "
            "bad = [m for m in ('tensorrt', 'cuda', 'onnxruntime', 'tensorflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_load_without_tensorrt_names_the_extra(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    trt_backend.write_metadata(plan, metadata())
    runner = TensorRTRunner("m", plan, SPEC_IN, SPEC_OUT)  # cheap: nothing imported yet
    with pytest.raises(MissingDependencyError, match=r"kestrel\[gpu\]"):
        runner.load()
    assert not runner.loaded


def test_create_runner_dispatches_tensorrt_plan(tmp_path):
    from serve.backends import create_runner
    from serve.repository import load_entry, make_config, write_config

    folder = tmp_path / "m_trt_fp16"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.plan").write_bytes(b"x")
    write_config(make_config("m_trt_fp16", "tensorrt_plan", SPEC_IN, SPEC_OUT, max_batch_size=4, labels=False), folder)
    runner = create_runner(load_entry(folder))
    assert isinstance(runner, TensorRTRunner) and not runner.loaded and runner.thread_safe is False
    assert runner.path == folder / "1" / "model.plan" and runner.max_batch_size == 4


# ---- plumbing against stand-ins for tensorrt and cuda-python --------------------------------
class FakeCudart:
    """Host memory posing as device memory; records the calls the runner makes."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self.blocks, self.calls = {}, []

    def cudaGetDevice(self):
        return 0, 0

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(name=b"NVIDIA A10\0\0", major=8, minor=6)

    def cudaStreamCreate(self):
        self.calls.append("stream")
        return 0, 77

    def cudaMalloc(self, nbytes):
        block = np.zeros(nbytes, np.uint8)
        self.blocks[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert stream == 77
        self.calls.append(("copy", kind, nbytes))
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self.calls.append("sync")
        return (0,)

    def cudaFree(self, ptr):
        self.blocks.pop(ptr)
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


def fake_tensorrt(version="10.3.0"):
    """Just enough of TensorRT 10's runtime API: the engine 'computes' softmax of per-channel means."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    dtype = lambda name: types.SimpleNamespace(name=name)  # noqa: E731

    class Context:
        def __init__(self):
            self.addresses, self.shape = {}, None

        def set_input_shape(self, name, shape):
            assert name == "images"
            self.shape = tuple(shape)
            return shape[0] <= 4

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            n = self.shape[0]
            count = int(np.prod(self.shape))
            x = np.ctypeslib.as_array((ctypes.c_uint8 * count).from_address(self.addresses["images"]))
            x = x.reshape(self.shape).astype(np.float32).mean(axis=(1, 2)) / 255.0
            e = np.exp(x - x.max(1, keepdims=True))
            out = (e / e.sum(1, keepdims=True)).astype(np.float32)
            ctypes.memmove(self.addresses["probabilities"], out.ctypes.data, out.nbytes)
            return stream == 77 and n > 0

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["images", "probabilities"][i]

        def get_tensor_mode(self, name):
            return "in" if name == "images" else "out"

        def get_tensor_dtype(self, name):
            return dtype("UINT8" if name == "images" else "FLOAT")

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 4, 4, 3), (2, 4, 4, 3), (4, 4, 4, 3)]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"engine" else None

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt.Runtime, trt.Logger = Runtime, Logger
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    cudart = FakeCudart()
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "cudart", lambda: cudart)
    return cudart


def test_runner_plumbing_with_stand_ins(tmp_path, fake_gpu):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    trt_backend.write_metadata(plan, metadata(profile={"min": 1, "opt": 2, "max": 4}))
    runner = TensorRTRunner("m", plan, SPEC_IN, SPEC_OUT, max_batch_size=32)
    batch = np.random.default_rng(0).integers(0, 255, (3, 4, 4, 3), dtype=np.uint8)
    with runner:
        assert runner.max_batch_size == 4  # the engine's profile caps the config's 32
        out = runner.infer(batch)
        x = batch.astype(np.float32).mean(axis=(1, 2)) / 255.0
        expected = np.exp(x) / np.exp(x).sum(1, keepdims=True)
        np.testing.assert_allclose(out, expected, rtol=1e-5)
        with pytest.raises(InvalidInputError, match="at most max_batch_size=4"):
            runner.infer(np.zeros((5, 4, 4, 3), np.uint8))
        copies = [c for c in fake_gpu.calls if isinstance(c, tuple)]
        assert copies == [("copy", 1, batch.nbytes), ("copy", 2, 3 * 3 * 4)]
        assert fake_gpu.calls[-1] == "sync"
    assert not fake_gpu.blocks  # device buffers freed on close


def test_runner_refuses_engine_from_another_gpu_before_deserializing(tmp_path, fake_gpu):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not even an engine")
    trt_backend.write_metadata(plan, metadata(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0"))
    with pytest.raises(EngineMismatchError, match="built for TensorRT 10.3.0 on NVIDIA H100"):
        TensorRTRunner("m", plan, SPEC_IN, SPEC_OUT).load()


def test_undeserializable_engine_says_how_to_rebuild(tmp_path, fake_gpu):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"corrupt")
    trt_backend.write_metadata(plan, metadata())
    with pytest.raises(ModelLoadError, match="could not deserialize.*--engine-only --force"):
        TensorRTRunner("m", plan, SPEC_IN, SPEC_OUT).load()


def test_failed_allocation_frees_what_was_allocated(tmp_path, fake_gpu, monkeypatch):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    trt_backend.write_metadata(plan, metadata())
    calls = {"n": 0}
    real_malloc = fake_gpu.cudaMalloc

    def malloc_once(nbytes):
        calls["n"] += 1
        return real_malloc(nbytes) if calls["n"] == 1 else (2, 0)  # 2 = cudaErrorMemoryAllocation

    monkeypatch.setattr(fake_gpu, "cudaMalloc", malloc_once)
    fake_gpu.cudaGetErrorName = lambda err: (0, b"cudaErrorMemoryAllocation")
    runner = TensorRTRunner("m", plan, SPEC_IN, SPEC_OUT)
    with pytest.raises(ModelLoadError, match="cudaMalloc.*cudaErrorMemoryAllocation"):
        runner.load()
    assert not runner.loaded and not fake_gpu.blocks
