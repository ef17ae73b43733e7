"""TensorRT build logic that runs without a GPU: profiles, flags, timing-cache paths, metadata,
the rebuild command, the --engine failure without TensorRT, and build_engine's call sequence
against a stand-in for TensorRT's builder API."""

from __future__ import annotations

import shlex
import sys
import types
from pathlib import Path

import pytest

from export import tensorrt as trt_build
from repo_modes import wrong_modes
from serve.backends.tensorrt import DeviceInfo, read_metadata
from serve.errors import ConfigError

DEVICE = DeviceInfo("10.3.0", "NVIDIA A10", "8.6")


def test_profile_defaults_and_validation():
    assert trt_build.compute_profile() == trt_build.Profile(1, 8, 32)
    assert trt_build.compute_profile(max_batch=4) == trt_build.Profile(1, 4, 4)  # opt clamped into range
    assert trt_build.compute_profile(min_batch=16) == trt_build.Profile(16, 16, 32)
    assert trt_build.compute_profile(min_batch=64) == trt_build.Profile(64, 64, 64)
    assert trt_build.compute_profile(2, 3, 5).shapes((224, 224)) == ((2, 224, 224, 3), (3, 224, 224, 3), (5, 224, 224, 3))
    with pytest.raises(ConfigError, match="min=4, opt=2, max=8"):
        trt_build.compute_profile(4, 2, 8)
    with pytest.raises(ConfigError, match="1 <= min-batch"):
        trt_build.compute_profile(0, 1, 1)
    with pytest.raises(ConfigError, match="over the limit"):
        trt_build.compute_profile(1, 1, 100_000)
    with pytest.raises(ConfigError, match="integer"):
        trt_build.Profile(1, 2.5, 4)


def test_precision_flags():
    assert trt_build.builder_flags("fp32") == ()
    assert trt_build.builder_flags("fp16") == ("FP16",)
    assert trt_build.builder_flags("int8") == ("INT8", "FP16")
    assert trt_build.engine_name("mobilenet_v2", "int8") == "mobilenet_v2_trt_int8"
    with pytest.raises(ConfigError, match="unknown precision 'tf32'"):
        trt_build.builder_flags("tf32")


def test_timing_cache_paths(tmp_path):
    default = trt_build.timing_cache_path(None, tmp_path / "models", DEVICE)
    assert default == tmp_path / "models" / ".tensorrt" / "timing-trt10.3.0-sm8.6.cache"
    folder = tmp_path / "caches"
    folder.mkdir()
    assert trt_build.timing_cache_path(folder, tmp_path, DEVICE) == folder / default.name
    assert trt_build.timing_cache_path(str(tmp_path / "new") + "/", tmp_path, DEVICE) == tmp_path / "new" / default.name
    assert trt_build.timing_cache_path(tmp_path / "my.cache", tmp_path, DEVICE) == tmp_path / "my.cache"


def test_timing_cache_read_and_atomic_write(tmp_path):
    path = tmp_path / "sub" / "t.cache"
    assert trt_build.read_timing_cache(path) == b""
    trt_build.write_bytes_atomic(path, b"abc")
    assert trt_build.read_timing_cache(path) == b"abc"
    assert [p.name for p in path.parent.iterdir()] == ["t.cache"]  # no temporary left behind


def test_rebuild_command_round_trips_through_the_cli_parser():
    from export.optimize import build_parser

    profile = trt_build.Profile(1, 4, 16)
    cmd = trt_build.rebuild_command("mnv2", "models", "int8", profile, workspace_mb=1024, calibration="data/cal")
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "export.optimize"]
    args = build_parser().parse_args(argv[3:])
    assert (args.name, args.precision, args.engine_only, args.force) == ("mnv2", "int8", True, True)
    assert (args.min_batch, args.opt_batch, args.max_batch, args.workspace_mb) == (1, 4, 16, 1024)
    assert args.calibration == "data/cal"


def test_probe_without_tensorrt_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(trt_build, "available", lambda module: False)
    with pytest.raises(trt_build.TensorRTUnavailableError, match="'tensorrt' package is not installed"):
        trt_build.probe_device()


class _Recorder:
    """A stand-in for TensorRT 10's builder API that records what build_engine asks for."""

    def __init__(self, parse_ok=True, build_ok=True):
        self.parse_ok, self.build_ok, self.calls = parse_ok, build_ok, []

    def module(self):
        rec = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = "10.3.0"
        trt.Logger = type("Logger", (), {"WARNING": 2, "INFO": 3, "__init__": lambda self, level: None})
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+new"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("pool", pool, size))

            def set_flag(self, flag):
                rec.calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                rec.calls.append(("add_profile", profile.shapes))

            def create_timing_cache(self, data):
                rec.calls.append(("cache_in", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                rec.calls.append(("set_cache", ignore_mismatch))

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                self.shapes = (name, lo, opt, hi)

        class Network:
            num_inputs = 1

            def get_input(self, i):
                return types.SimpleNamespace(name="images")

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls.append(("network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"PLAN" if rec.build_ok else None

        class Parser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec.calls.append(("parse", Path(path).name))
                return rec.parse_ok

            def get_error(self, i):
                return "Unsupported ONNX op FancyOp"

        trt.Builder, trt.OnnxParser = Builder, Parser
        return trt


def _meta(precision="int8"):
    return trt_build.make_metadata(DEVICE, precision=precision, profile=trt_build.Profile(1, 2, 4),
                                   input_name="images", output_name="probabilities", image_size=(16, 16),
                                   rebuild="python -m export.optimize tiny --engine-only --force")


def test_build_engine_call_sequence(tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module())
    cache = tmp_path / ".tensorrt" / "t.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"old")
    plan = tmp_path / "m" / "1" / "model.plan"
    result = trt_build.build_engine(tmp_path / "model.onnx", plan, _meta(), profile=trt_build.Profile(1, 2, 4),
                                    workspace_mb=512, timing_cache=cache)
    assert plan.read_bytes() == b"PLAN" and result.bytes == 4
    assert read_metadata(plan).precision == "int8" and read_metadata(plan).profile == {"min": 1, "opt": 2, "max": 4}
    assert cache.read_bytes() == b"old+new"  # the cache is loaded, extended and saved
    # plan, sidecar (atomic) and timing cache (atomic): 0644 like open()'s files
    assert wrong_modes(tmp_path / "m") == {} and wrong_modes(cache.parent) == {}
    assert rec.calls == [
        ("network", 0), ("parse", "model.onnx"), ("pool", "WORKSPACE", 512 << 20), ("flag", "INT8"), ("flag", "FP16"),
        ("add_profile", ("images", (1, 16, 16, 3), (2, 16, 16, 3), (4, 16, 16, 3))),
        ("cache_in", b"old"), ("set_cache", False),
    ]


def test_build_engine_reports_parser_and_builder_failures(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _Recorder(parse_ok=False).module())
    with pytest.raises(trt_build.EngineBuildError, match="Unsupported ONNX op FancyOp"):
        trt_build.build_engine(tmp_path / "m.onnx", tmp_path / "p.plan", _meta(), profile=trt_build.Profile(1, 2, 4))
    monkeypatch.setitem(sys.modules, "tensorrt", _Recorder(build_ok=False).module())
    with pytest.raises(trt_build.EngineBuildError, match="could not build a fp16 engine"):
        trt_build.build_engine(tmp_path / "m.onnx", tmp_path / "p.plan", _meta("fp16"), profile=trt_build.Profile(1, 2, 4))
    assert not (tmp_path / "p.plan").exists()
