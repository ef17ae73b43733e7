"""kestrel doctor: the CPU-only report line by line, and the --gpu TensorRT round trip on CPU stand-ins
(a fake builder writing the ONNX as the "engine", a runner executing it with onnxruntime), in the manner
of tests/export/test_tensorrt.py. The real --gpu path has never run: this machine has no GPU."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kestrel import doctor
from serve import cpuinfo

ROOT = Path(__file__).resolve().parents[2]


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_keras_home(tmp_path):
    from export.applications import APPLICATIONS

    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    for name in ("mobilenet_v2", "resnet50"):
        (home / "models" / APPLICATIONS[name].weights_file).write_bytes(b"not really weights")
    (home / "models" / "imagenet_class_index.json").write_text("{}")
    return home


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: the CPU-only "
                                                                    "lines do not apply")
def test_doctor_cpu_only_report_line_by_line(fake_keras_home, python_env):
    from export.applications import APPLICATIONS

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy, free = taken.getsockname()[1], _free_port()
    env = dict(python_env, KERAS_HOME=str(fake_keras_home))
    env.pop("KESTREL_VERBOSE", None)
    try:
        result = subprocess.run([sys.executable, "-m", "kestrel", "doctor", "--ports", f"{busy},{free}"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
    finally:
        taken.close()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    rows = [(ln[:18].strip(), ln[18:27].strip(), ln[27:]) for ln in lines[:-1]]
    labels = [r[0] for r in rows]
    assert labels == ["cpu", "int8 speed-up", "python", "kestrel", "onnxruntime", "tensorflow", "tf2onnx", "onnx",
                      "tensorrt", "cuda-python", "gpu", "imagenet weights", f"port {busy}", f"port {free}"], lines
    got = {r[0]: (r[1], r[2]) for r in rows}

    assert got["cpu"][0] == "ok"
    assert f"{cpuinfo.cpu_model()}, {os.cpu_count()} cores: {cpuinfo.summary()}" in got["cpu"][1]
    assert got["int8 speed-up"] == ("info", cpuinfo.int8_meaning())
    assert got["python"] == ("ok", f"{platform.python_version()} ({sys.executable})")
    assert got["kestrel"][0] == "ok" and str(ROOT) in got["kestrel"][1]

    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    if ort:
        assert got["onnxruntime"][0] == "ok"
        assert got["onnxruntime"][1].startswith(f"{ort}; execution providers: ")
        assert "CPUExecutionProvider" in got["onnxruntime"][1]
    else:
        assert got["onnxruntime"][0] == "missing"
    for module, dist in (("tensorflow", "tensorflow"), ("tf2onnx", "tf2onnx"), ("onnx", "onnx")):
        if importlib.util.find_spec(module):
            assert got[module][0] == "ok" and got[module][1].startswith(f"{_version(dist)} importable"), got[module]
        else:
            assert got[module][0] == "missing" and "pip install 'kestrel[export]'" in got[module][1]
    if importlib.util.find_spec("tensorrt") is None:
        assert got["tensorrt"][0] == "missing" and "kestrel[gpu]" in got["tensorrt"][1]
    if importlib.util.find_spec("cuda") is None:
        assert got["cuda-python"][0] == "missing"
    assert got["gpu"] == ("missing", "no NVIDIA GPU: nvidia-smi is not on PATH (CPU serving works; TensorRT "
                                     "engines need a GPU)")
    status, detail = got["imagenet weights"]
    assert status == "ok"
    assert detail.startswith(f"offline in KERAS_HOME={fake_keras_home}: mobilenet_v2, resnet50 (2 of "
                             f"{len(APPLICATIONS)})")
    assert "not there (would download): " in detail and "xception" in detail
    assert got[f"port {busy}"][0] == "warn" and got[f"port {busy}"][1].startswith("taken by another process")
    assert got[f"port {free}"] == ("ok", "free (asked for)")
    assert lines[-1].startswith("(kestrel doctor --gpu")
    # quiet: no TensorFlow start-up lines although the report imported it
    assert "cudart_stub" not in result.stderr and "absl::InitializeLog" not in result.stderr


def test_doctor_gpu_without_a_gpu_says_so_and_exits_1(monkeypatch, capsys, fake_keras_home):
    monkeypatch.setenv("KERAS_HOME", str(fake_keras_home))
    monkeypatch.setattr(doctor, "query_gpus", lambda run=None: None)
    monkeypatch.setattr(doctor, "probe_imports", lambda names: {n: {"ok": True, "version": "1"} for n in names})
    port = str(_free_port())
    assert doctor.main(["--ports", port]) == 0  # a report: missing things are not an error
    out = capsys.readouterr().out
    assert "gpu               missing  no NVIDIA GPU" in out
    assert doctor.main(["--gpu", "--ports", port]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gpu check         FAIL     no NVIDIA GPU on this machine (nvidia-smi is not on PATH)")


def test_query_gpus_parses_nvidia_smi_and_old_drivers():
    def new(argv):
        return "0, NVIDIA A10G, 8.6, 550.54.15, 23028 MiB\n1, NVIDIA L4, 8.9, 550.54.15, 23034 MiB\n"

    gpus = doctor.query_gpus(new)
    assert [g["compute_capability"] for g in gpus] == ["8.6", "8.9"]
    lines = doctor.check_gpus(gpus)
    assert [ln.render() for ln in lines][0] == ("gpu 0             ok       NVIDIA A10G, compute capability 8.6, "
                                                "driver 550.54.15, 23028 MiB")

    def old(argv):  # no compute_cap field: the first query prints nothing useful
        return "" if "compute_cap" in argv[1] else "0, Tesla T4, 470.82, 15109 MiB\n"

    assert doctor.query_gpus(old)[0]["compute_capability"] == "?"
    assert doctor.query_gpus(lambda argv: None) is None
    assert doctor.check_gpus([])[0].status == "missing"


def test_weights_line_without_any_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    line = doctor.check_weights()[0]
    assert line.status == "missing" and f"none in KERAS_HOME={tmp_path}/models" in line.detail


def test_import_problems_are_reported_not_raised(monkeypatch):
    monkeypatch.setattr(doctor, "_installed", lambda module: module in ("tensorflow", "onnx"))
    lines = doctor.check_imports(lambda names: {"tensorflow": {"ok": False, "error": "ImportError: libfoo.so"},
                                                "onnx": {"ok": True, "version": "9.9"}})
    got = {ln.label: ln for ln in lines}
    assert got["tensorflow"].status == "warn" and "does not import: ImportError: libfoo.so" in got["tensorflow"].detail
    assert got["onnx"].status == "ok" and got["onnx"].detail.startswith("9.9 importable")
    assert got["tensorrt"].status == "missing" and got["cuda-python"].status == "missing"


# ---- --gpu on CPU stand-ins -------------------------------------------------------------------------------
def _parts(*, perturb=0.0, device_cc="8.6", build_cc=None, fail_probe=None, accept_oversize=False):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from export.tensorrt import BuildResult, TensorRTUnavailableError
    from serve.backends.onnxruntime import OnnxRuntimeRunner
    from serve.backends.tensorrt import DeviceInfo, check_compatible, read_metadata, write_metadata

    device = DeviceInfo("10.3.0", "NVIDIA A10", device_cc)
    calls = []

    def probe_device():
        if fail_probe:
            raise TensorRTUnavailableError(fail_probe)
        return device

    def build_engine(onnx_path, plan_path, metadata, *, profile, workspace_mb):
        calls.append(("build", metadata.precision, profile.as_dict(), workspace_mb))
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_bytes(Path(onnx_path).read_bytes())  # the stand-in "engine" is the ONNX itself
        if build_cc:
            from dataclasses import replace

            metadata = replace(metadata, compute_capability=build_cc)
        write_metadata(plan_path, metadata)
        return BuildResult(plan_path, plan_path.with_name(plan_path.name + ".json"), None, plan_path.stat().st_size)

    class StandInTensorRT(OnnxRuntimeRunner):
        """What TensorRTRunner does before running: read the sidecar, check it against the device."""

        def __init__(self, name, plan, input_spec, output_spec, max_batch_size=0):
            super().__init__(name, plan, input_spec, output_spec, max_batch_size=0 if accept_oversize else max_batch_size)
            calls.append(("runner", Path(plan).parent.name, max_batch_size))

        def _load(self):
            check_compatible(read_metadata(self.path), device)
            super()._load()

        def _infer(self, batch):
            return super()._infer(batch) + perturb

    reference = lambda name, path, i, o: OnnxRuntimeRunner(name, path, i, o)  # noqa: E731
    return doctor.GpuParts(probe_device, build_engine, StandInTensorRT, reference), calls


GPUS = [{"index": "0", "name": "NVIDIA A10", "compute_capability": "8.6", "driver": "550", "memory": "23028 MiB"}]


def test_gpu_check_passes_with_numbers(tmp_path):
    parts, calls = _parts()
    lines = doctor.gpu_check(tmp_path, parts, gpus=GPUS)
    by = {ln.label: ln for ln in lines}
    assert [ln.status for ln in lines] == ["PASS"] * len(lines), [ln.render() for ln in lines]
    assert list(by) == ["gpu device", "tensorrt fp32 build", "tensorrt fp32 sidecar", "tensorrt fp32 run",
                        "tensorrt fp32 limits", "tensorrt fp16 build", "tensorrt fp16 sidecar", "tensorrt fp16 run",
                        "tensorrt fp16 limits", "gpu check"]
    assert by["gpu device"].detail == "TensorRT 10.3.0 on NVIDIA A10 (compute capability 8.6)"
    run = by["tensorrt fp32 run"].detail
    assert "batches 1/3/8" in run and "top-1 agreement 12/12" in run and "max |TensorRT - onnxruntime| 0.00e+00" in run
    assert "batch 9 (over the profile max 8) refused" in by["tensorrt fp16 limits"].detail
    assert ("build", "fp32", {"min": 1, "opt": 4, "max": 8}, 256) in calls
    assert ("runner", "fp16", 8) in calls
    sidecar = (tmp_path / "fp32" / "model.plan.json").read_text()
    assert '"rebuild_command": "kestrel doctor --gpu"' in sidecar and '"source_sha256": ' in sidecar


def test_gpu_check_fails_when_outputs_differ(tmp_path):
    parts, _ = _parts(perturb=0.05)
    lines = doctor.gpu_check(tmp_path, parts, gpus=GPUS, precisions=("fp32",))
    by = {ln.label: ln for ln in lines}
    assert by["tensorrt fp32 run"].status == "FAIL"
    assert "max |TensorRT - onnxruntime| 5.00e-02 (limit 1e-03)" in by["tensorrt fp32 run"].detail
    assert lines[-1].status == "FAIL" and "tensorrt fp32 run" in lines[-1].detail


def test_gpu_check_fails_on_a_sidecar_for_another_gpu(tmp_path):
    parts, calls = _parts(build_cc="9.0")
    lines = doctor.gpu_check(tmp_path, parts, gpus=GPUS, precisions=("fp16",))
    by = {ln.label: ln for ln in lines}
    assert by["tensorrt fp16 sidecar"].status == "FAIL"
    assert "compute capability 9.0 (this machine's GPU has 8.6)" in by["tensorrt fp16 sidecar"].detail
    assert "tensorrt fp16 run" not in by and not any(c[0] == "runner" for c in calls)
    assert lines[-1].status == "FAIL"


def test_gpu_check_fails_when_oversized_batches_are_accepted(tmp_path):
    parts, _ = _parts(accept_oversize=True)
    by = {ln.label: ln for ln in doctor.gpu_check(tmp_path, parts, gpus=GPUS, precisions=("fp32",))}
    assert by["tensorrt fp32 limits"].status == "FAIL" and by["gpu check"].status == "FAIL"


def test_gpu_check_without_tensorrt_says_what_to_install(tmp_path):
    parts, _ = _parts(fail_probe="--engine needs TensorRT and an NVIDIA GPU: the 'tensorrt' package is not installed")
    lines = doctor.gpu_check(tmp_path, parts, gpus=GPUS)
    assert [ln.label for ln in lines] == ["gpu device", "gpu check"]
    assert lines[0].status == "FAIL" and "'tensorrt' package is not installed" in lines[0].detail


def test_gpu_main_exit_status_follows_the_verdict(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "query_gpus", lambda run=None: GPUS)
    monkeypatch.setattr(doctor, "probe_imports", lambda names: {n: {"ok": True, "version": "1"} for n in names})
    port = str(_free_port())
    parts, _ = _parts()
    assert doctor.main(["--gpu", "--ports", port, "--keep", str(tmp_path / "keep")], parts=parts) == 0
    out = capsys.readouterr().out
    assert "gpu 0             ok       NVIDIA A10, compute capability 8.6" in out
    assert out.strip().splitlines()[-1].startswith("gpu check         PASS")
    assert (tmp_path / "keep" / "doctor.onnx").is_file() and (tmp_path / "keep" / "fp16" / "model.plan").is_file()
    bad, _ = _parts(perturb=1.0)
    assert doctor.main(["--gpu", "--ports", port], parts=bad) == 1


def test_small_onnx_has_a_dynamic_batch(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = doctor.small_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].name == "probabilities"
