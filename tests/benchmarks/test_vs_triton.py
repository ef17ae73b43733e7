"""The Triton comparison (`kestrel bench vs-triton`) without a Triton binary or a big model: the Triton
repository it builds, the python-backend model.py against fakes of Triton's and onnxruntime's modules,
the report from synthetic results, the CLI's errors, and the tritonclient load generator against a
Kestrel server of fake models (in subprocesses: tritonclient and serve._proto cannot share a process).
One slow test runs the whole comparison on a tiny ONNX model when .venv-triton exists."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from benchmarks import request_path, triton_repo, vs_triton, vs_triton_report
from benchmarks._procs import BenchmarkError, KestrelServer
from serve.errors import KestrelError
from serve.repository import PLATFORM_ONNX, TensorSpec, make_config, read_config, write_config

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None  # never imported here


def _onnx_entry(repo: Path, name: str = "m", *, parameters: dict | None = None, delay_us: int = 1500,
                max_batch: int = 16, instances: int = 1) -> Path:
    """A Kestrel ONNX entry (config, labels, a placeholder model.onnx: nothing here loads it)."""
    config = make_config(name, PLATFORM_ONNX, TensorSpec("images", np.uint8, (24, 24, 3)),
                         TensorSpec("probabilities", np.float32, (5,)), max_batch_size=max_batch,
                         max_queue_delay_us=delay_us, instance_count=instances, parameters=parameters)
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    write_config(config, folder)
    (folder / "labels.txt").write_text("\n".join(f"c{i}" for i in range(5)) + "\n")
    (folder / "1" / "model.onnx").write_bytes(b"placeholder")
    return folder


# ---- the Triton repository ----------------------------------------------------------------------
def test_triton_repository_serves_kestrels_onnx_through_the_python_backend(tmp_path):
    kestrel = tmp_path / "kestrel"
    _onnx_entry(kestrel, "m", delay_us=1500, max_batch=16, instances=2)
    built = triton_repo.build_repository(kestrel, ["m"], tmp_path / "triton", ort_threads=3)

    ours = read_config(kestrel / "m" / "config.pbtxt")
    theirs = read_config(tmp_path / "triton" / "m" / "config.pbtxt")  # parses as a ModelConfig
    assert theirs.backend == "python" and theirs.platform == "" and not theirs.default_model_filename
    assert theirs.max_batch_size == ours.max_batch_size == 16
    assert theirs.dynamic_batching == ours.dynamic_batching  # same delay and queue
    assert theirs.dynamic_batching.max_queue_delay_microseconds == 1500
    assert list(theirs.input) == list(ours.input) and list(theirs.output) == list(ours.output)
    assert list(theirs.instance_group) == list(ours.instance_group)
    params = {k: v.string_value for k, v in theirs.parameters.items()}
    assert params["onnx_path"] == str((kestrel / "m" / "1" / "model.onnx").resolve())  # Kestrel's file, not a copy
    assert params["intra_op_thread_count"] == "3" and params["inter_op_thread_count"] == "0"
    assert (tmp_path / "triton" / "m" / "labels.txt").read_text() == (kestrel / "m" / "labels.txt").read_text()
    model_py = tmp_path / "triton" / "m" / "1" / "model.py"
    assert model_py.read_text() == triton_repo.MODEL_FILE.read_text()
    compile(model_py.read_text(), str(model_py), "exec")
    assert built["m"] == {"onnx": params["onnx_path"], "threads": {"intra_op_thread_count": 3,
                                                                  "inter_op_thread_count": 0},
                          "max_batch_size": 16, "max_queue_delay_us": 1500, "instances": 2}


def test_triton_can_be_given_two_instances_of_one_thread(tmp_path):
    """--triton-instances / --triton-threads: Triton's arrangement changes (two batches side by side, as
    Kestrel's adaptive threads under load), everything else stays Kestrel's config."""
    kestrel = tmp_path / "kestrel"
    _onnx_entry(kestrel, "m", delay_us=1500, max_batch=16)
    built = triton_repo.build_repository(kestrel, ["m"], tmp_path / "triton", instances=2, instance_threads=1)
    ours = read_config(kestrel / "m" / "config.pbtxt")
    theirs = read_config(tmp_path / "triton" / "m" / "config.pbtxt")
    assert [(g.count, g.kind) for g in theirs.instance_group] == [(2, ours.instance_group[0].kind)]
    assert theirs.parameters["intra_op_thread_count"].string_value == "1"
    assert theirs.dynamic_batching == ours.dynamic_batching and theirs.max_batch_size == 16
    assert built["m"]["instances"] == 2 and built["m"]["threads"]["intra_op_thread_count"] == 1
    args = vs_triton.build_parser().parse_args(["--triton-instances", "2", "--triton-threads", "1"])
    settings = vs_triton.settings_from_args(args)
    assert (settings.triton_instances, settings.triton_threads) == (2, 1)
    with pytest.raises(KestrelError, match="--triton-instances -1"):
        vs_triton.Settings(triton_instances=-1).resolved()


def test_thread_counts_follow_kestrels_backend(tmp_path):
    from serve.repository import load_entry

    plain = load_entry(_onnx_entry(tmp_path, "plain"))
    pinned = load_entry(_onnx_entry(tmp_path, "pinned", parameters={"intra_op_thread_count": "1",
                                                                     "inter_op_thread_count": "2"}))
    assert triton_repo.thread_counts(plain, 0, env={}) == {"intra_op_thread_count": 0, "inter_op_thread_count": 0}
    assert triton_repo.thread_counts(plain, 2, env={})["intra_op_thread_count"] == 2  # --ort-threads
    assert triton_repo.thread_counts(plain, 0, env={"KESTREL_ORT_THREADS": "4"})["intra_op_thread_count"] == 4
    # the model's own config wins over the server option, as in serve/backends/onnxruntime.py
    assert triton_repo.thread_counts(pinned, 2, env={}) == {"intra_op_thread_count": 1, "inter_op_thread_count": 2}


def test_the_run_records_whether_kestrel_runs_batches_side_by_side(tmp_path, monkeypatch):
    """From the runner the server would make (not loaded): the server's default, a thread count, the model's config."""
    monkeypatch.delenv("KESTREL_ORT_THREADS", raising=False)
    _onnx_entry(tmp_path, "plain")
    _onnx_entry(tmp_path, "off", parameters={"adaptive_threads": "false"})
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert vs_triton.side_by_side_models(tmp_path, ["plain", "off"], 0) == {"plain": True, "off": False}
    assert vs_triton.side_by_side_models(tmp_path, ["plain"], 2) == {"plain": False}  # --ort-threads
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert vs_triton.side_by_side_models(tmp_path, ["plain"], 0) == {"plain": False}


def test_the_report_describes_kestrels_arrangement_as_the_run_recorded_it():
    def kestrel_line(meta):
        return next(line for line in vs_triton_report.setup_lines(meta) if line.startswith("- Kestrel:"))

    assert kestrel_line(META).endswith("Python 3.11.7).")  # not recorded (older runs): nothing claimed
    side = kestrel_line({**META, "kestrel_server": {"side_by_side": {"m": True, "m_int8": True}}})
    assert "two batches side by side in a second session on half the cores" in side
    one = kestrel_line({**META, "kestrel_server": {"side_by_side": {"m": False}}})
    assert one.endswith("): one onnxruntime session per model.")


def test_a_model_that_is_not_onnx_is_refused(tmp_path):
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path / "kestrel", "toy", classes=2, labels=["a", "b"], size=(8, 8))
    with pytest.raises(KestrelError, match="needs an ONNX model"):
        triton_repo.build_repository(tmp_path / "kestrel", ["toy"], tmp_path / "triton")


def test_model_py_keeps_kestrels_disabled_optimizers():
    from benchmarks import triton_model
    from serve.backends import onnxruntime as kestrel_backend

    assert tuple(triton_model.DISABLED_OPTIMIZERS) == tuple(kestrel_backend.DISABLED_OPTIMIZERS)


# ---- model.py against fakes ---------------------------------------------------------------------
FAKES = textwrap.dedent('''
    import json, sys, types
    import numpy as np

    calls = {"run": [], "session": None, "entries": {}}

    ort = types.ModuleType("onnxruntime")
    class GraphOptimizationLevel:
        ORT_ENABLE_ALL = "all"
    class SessionOptions:
        def __init__(self):
            self.graph_optimization_level = None
            self.intra_op_num_threads = 0
            self.inter_op_num_threads = 0
        def add_session_config_entry(self, key, value):
            calls["entries"][key] = value
    class _Arg:
        def __init__(self, name):
            self.name = name
    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=None, disabled_optimizers=None):
            calls["session"] = {"path": path, "providers": providers, "disabled": disabled_optimizers,
                                "level": sess_options.graph_optimization_level,
                                "intra": sess_options.intra_op_num_threads, "inter": sess_options.inter_op_num_threads}
        def get_inputs(self):
            return [_Arg("onnx_in")]
        def get_outputs(self):
            return [_Arg("onnx_out")]
        def run(self, names, feeds):
            batch = feeds["onnx_in"]
            calls["run"].append((names, batch.shape))
            if FAIL and len(calls["run"]) > 1:  # the warm-up at initialize succeeds
                raise RuntimeError("boom")
            return [batch.reshape(len(batch), -1)[:, :5].astype(np.float64)]
    ort.GraphOptimizationLevel, ort.SessionOptions, ort.InferenceSession = GraphOptimizationLevel, SessionOptions, InferenceSession

    pb = types.ModuleType("triton_python_backend_utils")
    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array
        def as_numpy(self):
            return self.array
    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = list(output_tensors), error
    class TritonError:
        def __init__(self, message):
            self.message = message
    class Request:
        def __init__(self, tensors):
            self.tensors = {t.name: t for t in tensors}
    def get_input_tensor_by_name(request, name):
        return request.tensors.get(name)
    pb.Tensor, pb.InferenceResponse, pb.TritonError = Tensor, InferenceResponse, TritonError
    pb.get_input_tensor_by_name = get_input_tensor_by_name
    sys.modules["onnxruntime"] = ort
    sys.modules["triton_python_backend_utils"] = pb
''')

DRIVER = textwrap.dedent('''
    import importlib.util
    spec = importlib.util.spec_from_file_location("model", MODEL)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    config = json.loads(CONFIG)
    m = model.TritonPythonModel()
    m.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU"})
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8) for n in (1, 3, 2)]
    responses = m.execute([Request([Tensor("images", a)]) for a in arrays])
    out = {"session": calls["session"], "entries": calls["entries"],
           "runs": [[names, list(shape)] for names, shape in calls["run"]],
           "errors": [r.error.message if r.error else None for r in responses],
           "outputs": [[(t.name, list(t.as_numpy().shape), str(t.as_numpy().dtype),
                         bool(np.array_equal(t.as_numpy(), a.reshape(len(a), -1)[:, :5].astype(np.float32))))
                        for t in r.output_tensors] for r, a in zip(responses, arrays)]}
    print(json.dumps(out))
''')


def _run_model_py(tmp_path: Path, fail: bool) -> dict:
    kestrel = tmp_path / "kestrel"
    if not kestrel.exists():
        _onnx_entry(kestrel, "m")
        triton_repo.build_repository(kestrel, ["m"], tmp_path / "triton", ort_threads=2)
    config = read_config(tmp_path / "triton" / "m" / "config.pbtxt")
    from google.protobuf import json_format

    as_json = json_format.MessageToJson(config, preserving_proto_field_name=True)  # what Triton hands initialize
    code = (f"FAIL = {fail!r}\nMODEL = {str(tmp_path / 'triton' / 'm' / '1' / 'model.py')!r}\n"
            f"CONFIG = {as_json!r}\n" + FAKES + DRIVER)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_model_py_runs_every_request_of_a_batch_in_one_session_call(tmp_path):
    out = _run_model_py(tmp_path, fail=False)
    session = out["session"]
    assert session["path"] == str((tmp_path / "kestrel" / "m" / "1" / "model.onnx").resolve())
    assert session["providers"] == ["CPUExecutionProvider"] and session["disabled"] == ["WeightBiasQuantization"]
    assert session["level"] == "all" and session["intra"] == 2 and session["inter"] == 0
    assert out["entries"] == {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
    # the warm-up image at initialize (as Kestrel's Runner.warm_up), then 1 + 3 + 2 images in one call
    assert out["runs"] == [[["onnx_out"], [1, 24, 24, 3]], [["onnx_out"], [6, 24, 24, 3]]]
    assert out["errors"] == [None, None, None]
    assert out["outputs"] == [[["probabilities", [n, 5], "float32", True]] for n in (1, 3, 2)]


def test_model_py_answers_every_request_with_the_error_when_onnxruntime_fails(tmp_path):
    out = _run_model_py(tmp_path, fail=True)
    assert out["outputs"] == [[], [], []]
    assert all(e and "onnxruntime failed on a batch of 6: boom" in e for e in out["errors"])


def test_model_py_with_real_onnxruntime_matches_kestrels_runner(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    try:
        from serve_helpers import tiny_onnx_expected, write_tiny_onnx
    finally:
        sys.path.remove(str(ROOT / "tests" / "serve"))
    write_tiny_onnx(tmp_path / "kestrel", "tiny", classes=4, size=(16, 16))
    triton_repo.build_repository(tmp_path / "kestrel", ["tiny"], tmp_path / "triton")
    from google.protobuf import json_format

    import types

    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class Response:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = list(output_tensors), error

    pb.Tensor, pb.InferenceResponse, pb.TritonError = Tensor, Response, RuntimeError
    pb.get_input_tensor_by_name = lambda request, name: request[name]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("tiny_model", tmp_path / "triton" / "tiny" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToJson(read_config(tmp_path / "triton" / "tiny" / "config.pbtxt"),
                                       preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_config": config})
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for n in (2, 1)]
    responses = model.execute([{"images": Tensor("images", a)} for a in arrays])
    for response, array in zip(responses, arrays):
        np.testing.assert_allclose(response.output_tensors[0].as_numpy(), tiny_onnx_expected(array), atol=1e-5)


# ---- settings, ceiling arithmetic, CLI ----------------------------------------------------------
def test_settings_defaults_quick_and_refusals(tmp_path):
    s = vs_triton.Settings(repository=tmp_path, output=tmp_path / "out").resolved()
    assert s.clients == [1, 4, 8, 16, 32] and s.batches == [1, 8] and s.repeats == 3
    assert s.precisions == ["fp32", "int8"] and s.protocols == ["grpc", "http"]
    assert s.variant("int8") == "mobilenet_v2_int8" and s.ensemble == "imagenet" and s.ensemble_clients == 8
    parser = vs_triton.build_parser()
    quick = vs_triton.settings_from_args(parser.parse_args(["--quick", "--protocol", "grpc"]))
    assert quick.clients == [1, 8] and quick.repeats == 1 and quick.duration_s == 2.0 and quick.protocols == ["grpc"]
    assert vs_triton.settings_from_args(parser.parse_args(["--quick", "--clients", "16"])).clients == [16]
    assert s.request_path_clients == [4, 32] and quick.request_path_clients == [8]
    assert vs_triton.settings_from_args(parser.parse_args(["--request-path-clients", ""])).request_path_clients == []
    assert vs_triton.settings_from_args(parser.parse_args(["--request-path-clients", "2,16"])).request_path_clients == [
        2, 16]
    with pytest.raises(SystemExit):
        parser.parse_args(["--request-path-clients", "0"])
    for bad in (dict(precisions=["fp16"]), dict(protocols=[]), dict(clients=[0]), dict(request_path_clients=[0]),
                dict(repeats=0),
                dict(duration_s=0), dict(ort_threads=-1), dict(ensemble_only=True, ensemble="")):
        with pytest.raises(KestrelError):
            vs_triton.Settings(repository=tmp_path, output=tmp_path, **bad).resolved()


def test_ceiling_sizes_and_per_image_cost_between_measured_batches():
    assert vs_triton.ceiling_sizes([3.6, None, float("nan"), 31.5, 40.0], (1, 8, 64), 32) == {1, 3, 4, 8, 31, 32}
    costs = {"2": {"median_ms": 20.0}, "4": {"median_ms": 24.0}}  # 10 ms and 6 ms per image
    assert vs_triton_report.per_image_seconds(costs, 3.0) == pytest.approx(0.008)
    assert vs_triton_report.per_image_seconds(costs, 1.0) == pytest.approx(0.010)  # clamped to the measured range
    assert vs_triton_report.ceiling_at({"costs": {"m": costs}}, "m", 4.0) == pytest.approx(1 / 0.006)


def test_cli_help_and_a_clear_error_without_the_triton_venv(tmp_path):
    help_ = subprocess.run([sys.executable, "-m", "kestrel", "bench", "vs-triton", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "usage: kestrel bench vs-triton" in help_.stdout
    assert "native onnxruntime backend is not in that wheel" in " ".join(help_.stdout.split())
    _onnx_entry(tmp_path / "repo", "m")
    result = subprocess.run([sys.executable, "-m", "benchmarks.vs_triton", "--model", "m", "--repository",
                             str(tmp_path / "repo"), "--precision", "fp32", "--no-export", "--ensemble", "",
                             "--triton-venv", str(tmp_path / "no-venv"), "--output", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "make bench-triton" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "benchmarks.vs_triton", "--protocol", "grpc,quic"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected some of grpc,http" in bad.stderr


# ---- the report from synthetic results ----------------------------------------------------------
def _rows() -> list[dict]:
    rows = []
    measured = {  # (clients, round): (kestrel img/s, triton img/s, kestrel p95, triton p95, batches)
        (1, 0): (120.0, 100.0, 9.0, 12.0, (1.0, 1.0)),
        (1, 1): (130.0, 100.0, 10.0, 10.0, (1.0, 1.0)),
        (1, 2): (125.0, 100.0, 11.0, 11.0, (1.0, 1.0)),
        (16, 0): (180.0, 200.0, 90.0, 80.0, (6.0, 8.0)),
        (16, 1): (190.0, 200.0, 100.0, 80.0, (6.0, 8.0)),
        (16, 2): (170.0, 200.0, 110.0, 80.0, (7.0, 8.0)),
    }
    for (clients, repeat), (k, t, kp, tp, (kb, tb)) in measured.items():
        for server, rate, p95, batch in (("kestrel", k, kp, kb), ("triton", t, tp, tb)):
            rows.append(dict(server=server, precision="fp32", protocol="grpc", batch=1, clients=clients,
                             repeat=repeat, model="m", requests=100, images=100, errors=1 if server == "triton" else 0,
                             images_per_s=rate, p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95 * 1.5, mean_batch=batch,
                             loadgen_cores=0.3, busy_cores=1.9, foreign_cores=0.05,
                             own_cores=1.8 if server == "kestrel" else 1.6,
                             error_messages={"timeout": 1} if server == "triton" else {}, error=""))
    return rows


CEILING = {"costs": {"m": {"1": {"median_ms": 5.0, "low_ms": 4.9, "high_ms": 5.2, "images_per_s": 200.0},
                           "6": {"median_ms": 24.0, "low_ms": 23.0, "high_ms": 25.0, "images_per_s": 250.0},
                           "8": {"median_ms": 30.0, "low_ms": 29.0, "high_ms": 31.0, "images_per_s": 266.7}}},
           "load": {"foreign_cores": 0.01}}
META = {"kind": "vs-triton", "settings": {"model": "m", "repeats": 3, "warmup_s": 2.0, "duration_s": 6.0,
                                          "images": "photos", "ort_threads": 0},
        "machine": {"cpu": "Test EPYC", "isa": "AVX-512 VNNI", "cores_usable": 2, "memory_gib": 24,
                    "load_average": [0.1, 0.1, 0.1], "python": "3.11.7"},
        "versions": {"kestrel": "0.1.0", "onnxruntime": "1.32.0", "numpy": "2.4.6", "tritonclient": "2.73.0"},
        "python": "3.11.7", "git": "abc", "started_utc": "2026-01-01 00:00:00", "duration_s": 100.0,
        "triton": {"versions": {"nvidia-pytriton": "0.7.0", "onnxruntime": "1.32.0", "numpy": "1.26.4"},
                   "python_backend_python": "3.11", "server": {"version": "2.51.0"},
                   "models": {"m": {"max_batch_size": 32, "max_queue_delay_us": 2000, "instances": 1,
                                    "threads": {"intra_op_thread_count": 0, "inter_op_thread_count": 0}}}},
        "notes": [], "skipped": []}


def test_report_medians_ratios_batches_and_ceiling(tmp_path):
    rows = _rows()
    agg = vs_triton_report.aggregate(rows)
    k1, t16 = agg[("fp32", "grpc", 1, 1, "kestrel")], agg[("fp32", "grpc", 1, 16, "triton")]
    assert k1["images_per_s"].median == 125.0 and (k1["images_per_s"].low, k1["images_per_s"].high) == (120.0, 130.0)
    assert t16["mean_batch"].median == 8.0 and t16["errors"] == 3 and agg[("fp32", "grpc", 1, 16, "kestrel")][
        "mean_batch"].median == 6.0
    assert vs_triton_report.ratio(agg, ("fp32", "grpc", 1, 1)) == pytest.approx(1.25)
    assert sorted(vs_triton_report.paired(rows, ("fp32", "grpc", 1, 1))) == pytest.approx([1.2, 1.25, 1.3])
    assert vs_triton_report.ratio_text(agg, rows, ("fp32", "grpc", 1, 16)) == "0.90 (0.85-0.95)"
    assert vs_triton_report.ratio(agg, ("fp32", "grpc", 1, 16), "p95_ms") == pytest.approx(1.25)

    text = vs_triton_report.markdown(META, rows, CEILING, {}, {"m": {"images": 13, "top1_agreement": 1.0,
                                                                    "max_abs_diff": 1e-6}})
    assert "Triton's native onnxruntime backend is not in that wheel, so this is Triton with its Python backend" in text
    assert "**Machine:** Test EPYC (AVX-512 VNNI), 2 cores usable" in text
    # server CPU per image: Kestrel 1.8 cores / 120, 125, 130 img/s -> 14.40 ms (median); Triton 1.6 / 100 = 16.00
    assert ("| 1 | 125.0 (120.0-130.0) | 100.0 | 1.25 (1.20-1.30) | 1.00 / 1.00 | 62 % / 50 % | 14.40 / 16.00 | "
            "0 / 3 |") in text
    # 16 clients: Kestrel formed batches of 6 (24 ms -> 250 img/s in process), Triton 8 (266.7 img/s)
    assert ("| 16 | 180.0 (170.0-190.0) | 200.0 | 0.90 (0.85-0.95) | 6.00 (6.00-7.00) / 8.00 | 72 % / 75 % | "
            "10.00 / 8.00 |") in text
    assert "*Server CPU ms/image*" in text
    assert "Kestrel/Triton throughput 1.25 at 1, 0.90 at 16 client(s)" in text
    assert "| 16 | 50.0 / 100.0 / 150.0 | 40.0 / 80.0 / 120.0 | 1.25 (1.12-1.38) |" in text  # p95 under load
    assert "Kestrel 180.0 img/s = 72 % of onnxruntime alone" in text
    assert "| m | 6 | 24.00 (23.00-25.00) | 250.0 |" in text
    assert "top-1 agreement 100 % on 13 images" in text and "triton: timeout (6x)" in text
    assert "tritonserver` 2.51.0 from PyPI's nvidia-pytriton 0.7.0" in text and "numpy 1.26.4" in text


def test_server_cpu_comes_from_the_measured_window_and_older_runs_are_marked():
    rows = _rows()
    old = vs_triton_report.markdown(META, rows, CEILING, {}, {})
    assert "predate the per-window measurement" in old and "14.40 / 16.00" in old  # own_cores, as recorded then
    for r in rows:  # the server's own CPU over the window: Kestrel 1.5 cores, Triton 1.2
        r["server_cores"] = 1.5 if r["server"] == "kestrel" else 1.2
    new = vs_triton_report.markdown(META, rows, CEILING, {}, {})
    assert "predate the per-window measurement" not in new
    assert "| 62 % / 50 % | 12.00 / 12.00 |" in new  # 1.5 / 125 img/s and 1.2 / 100 img/s, in ms


# ---- the request path alone ---------------------------------------------------------------------
def test_the_request_path_model_does_no_work_with_the_compared_models_tensors(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from serve.repository import ModelRepository

    _onnx_entry(tmp_path / "repo", "m", parameters={"precision": "int8"}, delay_us=700, max_batch=12, instances=2)
    target = request_path.write_repository(tmp_path / "repo", "m", tmp_path / "nop")
    entry = ModelRepository(target).entry(request_path.NAME)
    source = ModelRepository(tmp_path / "repo").entry("m")
    assert entry.input_spec == source.input_spec and entry.output_spec == source.output_spec
    assert entry.max_batch_size == 12 and entry.parameters == {"precision": "int8"}
    assert entry.config.dynamic_batching.max_queue_delay_microseconds == 700
    assert entry.config.instance_group[0].count == 2
    assert (target / request_path.NAME / "labels.txt").read_text() == (tmp_path / "repo" / "m" / "labels.txt").read_text()
    session = ort.InferenceSession(str(target / request_path.NAME / "1" / "model.onnx"))
    for n in (1, 3):
        images = np.random.default_rng(n).integers(0, 256, (n, 24, 24, 3), np.uint8)
        out = session.run(None, {"images": images})[0]
        assert out.shape == (n, 5) and out.dtype == np.float32 and np.allclose(out, 0.2)
    with pytest.raises(KestrelError):  # no such model
        request_path.write_repository(tmp_path / "repo", "missing", tmp_path / "nop2")


def test_the_request_path_model_needs_an_onnx_model_with_a_numeric_output(tmp_path):
    pytest.importorskip("onnx")
    from serve.repository import BACKEND_KERAS

    folder = tmp_path / "repo" / "k"
    (folder / "1").mkdir(parents=True)
    write_config(make_config("k", BACKEND_KERAS, TensorSpec("images", np.uint8, (8, 8, 3)),
                             TensorSpec("probabilities", np.float32, (3,))), folder)
    with pytest.raises(ValueError, match="copies an ONNX model's config"):
        request_path.write_repository(tmp_path / "repo", "k", tmp_path / "nop")
    with pytest.raises(ValueError, match="numeric output"):
        request_path.nop_model(TensorSpec("images", np.uint8, (8, 8, 3)), TensorSpec("names", np.object_, (3,)))


def test_report_the_request_path_alone_per_protocol_and_clients():
    rows = []
    for repeat, (k, t) in enumerate(((0.6, 0.3), (0.55, 0.25), (0.7, 0.3))):  # server cores; 1000 req/s each
        for server, cores in (("kestrel", k), ("triton", t)):
            rows.append(dict(server=server, precision=request_path.NAME, protocol="grpc", batch=1, clients=32,
                             repeat=repeat, model=request_path.NAME, requests=6000, errors=0, requests_per_s=1000.0,
                             server_cores=cores, mean_batch=1.5 if server == "kestrel" else 8.0, error=""))
    rows.append(dict(rows[0], protocol="http", clients=4, server_cores=None))  # not measured: n/a, not 0
    rows.append(dict(rows[0], protocol="http", clients=4, server="triton", requests=0, errors=0,
                     error="the load generator wrote no record (exit 1)"))  # a failed run: counted, not averaged
    lines = request_path.summarise(rows)
    assert [(x["protocol"], x["clients"]) for x in lines] == [("grpc", 32), ("http", 4)]
    grpc = lines[0]
    assert grpc["kestrel"]["cpu_us_per_request"].median == pytest.approx(600)
    assert grpc["triton"]["cpu_us_per_request"].median == pytest.approx(300)
    assert grpc["extra_us"].median == pytest.approx(300) and (grpc["extra_us"].low, grpc["extra_us"].high) == (
        pytest.approx(300), pytest.approx(400))
    text = "\n".join(vs_triton_report.request_path_lines({"source": "m_int8", "rows": rows}))
    assert "## The request path alone" in text and "`m_int8`'s input, output" in text
    assert "| gRPC | 32 | 1000 | 1000 | 1.50 / 8.00 | 600 (550-700) | 300 (250-300) | 300 (300-400) | 0 / 0 |" in text
    assert "| HTTP | 4 | 1000 | n/a | 1.50 / n/a | n/a | n/a | n/a | 0 / 0 (+1 failed runs) |" in text
    assert vs_triton_report.request_path_lines({}) == []
    report = vs_triton_report.markdown(META, _rows(), CEILING, {}, {}, {"source": "m_int8", "rows": rows})
    assert report.index("## The request path alone") < report.index("## In-process ceiling")
    assert "request_path_repository/" in report
    assert "- triton request_path http batch 1 x 4: the load generator wrote no record (exit 1)" in report


@pytest.mark.parametrize("error", [BenchmarkError("Triton exited"), ImportError("No module named 'onnx'")])
def test_a_request_path_that_cannot_run_leaves_a_note_not_a_lost_report(tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(vs_triton, "request_path_runs", fail)
    notes: list[str] = []
    s = vs_triton.Settings(repository=tmp_path, output=tmp_path / "out").resolved()
    assert vs_triton.request_path_section(s, "m", tmp_path, tmp_path, [], 0.0, notes) == {}
    assert notes == [f"the request path alone was not measured: {type(error).__name__}: {error}"]


def test_report_ensemble_against_its_summed_member_cost(tmp_path):
    costs = {"a": {1: {"median_ms": 10.0}, 2: {"median_ms": 16.0}},  # 8 ms per image at batch 2
             "b": {2: {"median_ms": 8.0}}}  # 4 ms per image
    ensemble = {"name": "trio", "members": ["a", "b"], "clients": 8,
                "runs": [{"requests": 50, "images_per_s": 60.0, "p95_ms": 200.0, "errors": 0, "error": "",
                          "members": {"a": 2.0, "b": 2.0}},
                         {"requests": 50, "images_per_s": 70.0, "p95_ms": 180.0, "errors": 0, "error": "",
                          "members": {"a": 2.0, "b": 2.0}}]}
    limit = vs_triton.ensemble_limit(ensemble, costs)
    assert limit["members"]["a"]["ms_per_image"] == pytest.approx(8.0)
    assert limit["limit"] == pytest.approx(1 / 0.012) and limit["throughput"] == 65.0
    assert limit["fraction"] == pytest.approx(65.0 * 0.012)
    assert "side_by_side_limit" not in limit  # no side-by-side costs: only the one-session limit
    ensemble["limit"] = limit
    text = vs_triton_report.markdown(META, _rows(), CEILING, ensemble, {})
    assert "Limit: 83.3 img/s. Measured: 65.0 img/s" in text and "**78 % of the limit**" in text
    assert "Ensemble trio (a, b) at 8 clients through Kestrel: 65.0 img/s = 78 % of the 83.3 img/s" in text
    assert "| a | 2.00 | 8.00 | n/a |" in text and "With the members' batches side by side" not in text

    # members run side by side under load: 5 + 5 ms per image that way -> a 100 img/s limit, 65 % of it
    limit = vs_triton.ensemble_limit(ensemble, costs, {"a": 5.0, "b": 5.0})
    assert limit["limit"] == pytest.approx(1 / 0.012)  # the one-session limit is unchanged
    assert limit["side_by_side_limit"] == pytest.approx(100.0) and limit["side_by_side_fraction"] == pytest.approx(0.65)
    assert vs_triton.ensemble_limit(ensemble, costs, {"a": 5.0}).keys() == limit.keys() - {
        "side_by_side_limit", "side_by_side_fraction"}  # one member without a cost: no side-by-side limit
    ensemble["limit"] = limit
    text = vs_triton_report.markdown(META, _rows(), CEILING, ensemble, {})
    assert "| a | 2.00 | 8.00 | 5.00 |" in text
    assert "With the members' batches side by side: limit 100.0 img/s, measured = **65 % of it**." in text
    assert "= 78 % of the 83.3 img/s its members' summed in-process cost allows (65 % of 100.0 img/s with their " \
           "batches side by side, as the server runs them)." in text

    # --ensemble-only: Triton never ran, and the report says so instead of printing its versions as "?"
    only = {**META, "settings": {**META["settings"], "ensemble_only": True}, "triton": {}}
    text = vs_triton_report.markdown(only, [], {}, ensemble, {})
    assert "**Triton:** not run (`--ensemble-only`)" in text and "- Triton: not run (`--ensemble-only`" in text
    assert "tritonserver` ?" not in text and "Triton ?" not in text and "## Results" not in text
    assert "No load run completed" not in text
    assert "With the members' batches side by side: limit 100.0 img/s" in text


def test_side_by_side_costs_are_measured_at_the_batch_each_member_formed(tmp_path, monkeypatch):
    asked = []

    def fake_side_by_side(repository, model, size, *, images, seconds):
        asked.append((model, size, seconds))
        return {"a": 200.0, "b": None}[model]  # b runs in one session: no side-by-side cost

    monkeypatch.setattr("benchmarks.ceiling_share.side_by_side", fake_side_by_side)
    ensemble = {"name": "trio", "members": ["a", "b"], "clients": 8,
                "runs": [{"requests": 5, "error": "", "members": {"a": 2.6, "b": 1.0}},
                         {"requests": 5, "error": "", "members": {"a": 3.0, "b": 1.0}},
                         {"requests": 0, "error": "timeout", "members": {"a": 9.0, "b": 9.0}}]}
    costs = vs_triton.side_by_side_costs(tmp_path, ensemble, images=None, seconds=0.5)
    assert asked == [("a", 3, 0.5), ("b", 1, 0.5)]  # the median of the good rounds' batches, rounded
    assert costs == {"a": pytest.approx(5.0)}


def test_report_writes_plots_and_rebuilds_from_results_json(tmp_path):
    pytest.importorskip("matplotlib")
    vs_triton.write_results(tmp_path, META, _rows(), CEILING, {}, {})
    assert vs_triton_report.main([str(tmp_path)]) == 0
    assert (tmp_path / "throughput.png").stat().st_size > 1000 and (tmp_path / "latency_p95.png").is_file()
    assert "![throughput](throughput.png)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "runs.csv").read_text().count("\n") == len(_rows()) + 1


def test_docs_take_the_newest_full_triton_report_apart_from_the_server_report(tmp_path):
    from benchmarks import docs

    results = tmp_path / "benchmarks" / "results"
    for name, quick, speed in (("20260101T000000Z", False, 111.0), ("20260102T000000Z", True, 999.0)):
        folder = results / name
        folder.mkdir(parents=True)
        meta = dict(META, settings=dict(META["settings"], quick=quick))
        rows = [dict(r, images_per_s=speed) for r in _rows()]
        vs_triton.write_results(folder, meta, rows, CEILING, {}, {})
        (folder / "report.md").write_text(vs_triton_report.markdown(meta, rows, CEILING, {}, {}))
    assert docs.newest_server_report(results) is None  # not mistaken for `kestrel bench`'s report
    assert docs.newest_triton_report(results).parent.name == "20260101T000000Z"  # the quick run is skipped
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(f"# Benchmarks\n\n{docs.START}\n{docs.END}\n")
    assert docs.main(["--results", str(results), "--docs", str(page)]) == 0
    block = page.read_text().split(docs.START)[1]
    assert "### Kestrel vs Triton: `20260101T000000Z/report.md`" in block
    assert "[20260101T000000Z/report.md](../benchmarks/results/20260101T000000Z/report.md)" in block
    assert "Triton with its Python backend" in block and "\n### Latency under load\n" in block
    assert "999.0" not in block and "![throughput](../benchmarks/results/20260101T000000Z/throughput.png)" in block


# ---- the load generator against a Kestrel server of fake models ---------------------------------
@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    if not HAS_TRITONCLIENT:
        pytest.skip("tritonclient is not installed (pip install 'kestrel[dev]')")
    from PIL import Image

    from serve.backends.fake import write_fake_model

    root = tmp_path_factory.mktemp("vs-triton-load")
    labels = [f"c{i}" for i in range(7)]
    write_fake_model(root / "models", "toy", classes=7, labels=labels, size=(32, 32), delay_ms=2.0, max_queue_delay_us=1000)
    write_fake_model(root / "models", "broken", classes=7, labels=labels, size=(32, 32), fail_infer="simulated failure")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), np.uint8)).save(photos / f"p{i}.png")
    server = KestrelServer(root / "models", ["toy", "broken"], root / "server.log")
    try:
        server.wait_ready(60)
        yield server, photos, root
    finally:
        server.stop()


def _load(server, photos, root, *args, protocol="grpc") -> dict:
    url = server.address if protocol == "grpc" else f"127.0.0.1:{server.http_port}"
    out = root / f"load_{protocol}_{abs(hash(args))}.json"
    command = [sys.executable, "-m", "benchmarks.triton_load", *args[:1], "--url", url, "--protocol", protocol,
               "--images", str(photos), "--output", str(out), *args[1:]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_load_generator_counts_images_latencies_and_the_batches_the_server_formed(fake_server, protocol):
    server, photos, root = fake_server
    record = _load(server, photos, root, "run", "--model", "toy", "--clients", "3", "--batch", "2", "--duration",
                   "1.5", "--warmup", "0.3", "--stats-url", server.address, "--cpu-pids", str(server.process.pid),
                   protocol=protocol)
    assert record["errors"] == 0 and record["error_messages"] == {} and record["stuck_clients"] == 0
    # the server's CPU over the window: busy answering (some CPU), never more than the machine's cores
    assert 0 < record["server_cores"] <= os.cpu_count()
    assert record["requests"] > 10 and record["images"] == 2 * record["requests"]
    assert len(record["response_times_ms"]) == record["requests"]
    assert record["images_per_s"] == pytest.approx(record["images"] / record["window_s"], rel=1e-3)
    assert 0 < record["p50_ms"] <= record["p95_ms"] <= record["p99_ms"]
    executed = record["executed"]["toy"]
    # the statistics over the window: 3 clients of 2 images -> batches of 2 to 6 images
    assert executed["inference_count"] >= record["images"] - 6 and executed["execution_count"] > 0
    assert 2.0 <= record["mean_batch"] <= 6.0
    assert record["image_count"] == 5 and record["input_size"] == [32, 32]


def test_load_generator_counts_failed_requests_as_errors(fake_server):
    server, photos, root = fake_server
    record = _load(server, photos, root, "run", "--model", "broken", "--clients", "2", "--duration", "0.6",
                   "--warmup", "0")
    assert record["requests"] == 0 and record["errors"] > 0
    assert any("simulated failure" in m for m in record["error_messages"])
    assert record["server_cores"] is None  # no --cpu-pids: not measured


def test_load_generator_compare_and_it_never_imports_kestrels_protobufs(fake_server):
    server, photos, root = fake_server
    record = _load(server, photos, root, "compare", "--model", "toy", "--url", server.address)
    assert record["images"] == 5 and record["max_abs_diff"] == 0.0 and record["top1_agreement"] == 1.0
    code = ("import sys, benchmarks.triton_load, benchmarks._images, tritonclient.grpc, tritonclient.http; "
            "bad = [m for m in sys.modules if m.startswith('serve._proto')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_load_generator_names_an_unknown_model_in_one_line(fake_server):
    server, photos, root = fake_server
    result = subprocess.run([sys.executable, "-m", "benchmarks.triton_load", "run", "--url", server.address,
                             "--model", "nope", "--duration", "0.5", "--images", str(photos)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith(f"error: nope at {server.address}: ")
    assert "Traceback" not in result.stderr


# ---- the whole comparison, for real, when .venv-triton exists -----------------------------------
@pytest.mark.slow
def test_the_whole_comparison_on_a_tiny_onnx_model(tmp_path):
    venv = ROOT / ".venv-triton"
    try:
        triton_repo.find_install(venv)
    except KestrelError as exc:
        pytest.skip(f"no Triton: {exc}")
    if not HAS_TRITONCLIENT:
        pytest.skip("tritonclient is not installed")
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    try:
        from serve_helpers import write_tiny_onnx
    finally:
        sys.path.remove(str(ROOT / "tests" / "serve"))
    write_tiny_onnx(tmp_path / "models", "tiny", classes=4, size=(16, 16))
    result = subprocess.run([sys.executable, "-m", "benchmarks.vs_triton", "--model", "tiny", "--repository",
                             str(tmp_path / "models"), "--precision", "fp32", "--protocol", "grpc,http", "--batch",
                             "1", "--clients", "2", "--repeats", "1", "--duration", "1", "--warmup", "0.5",
                             "--no-export", "--ensemble", "", "--ceiling-batch", "1", "--request-path-clients", "2",
                             "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    both = {(s, p) for s in ("kestrel", "triton") for p in ("grpc", "http")}
    assert {(r["server"], r["protocol"]) for r in data["runs"]} == both
    assert all(r["requests"] > 0 and r["errors"] == 0 and not r["error"] and r["server_cores"] > 0
               for r in data["runs"])
    path_rows = data["request_path"]["rows"]
    assert {(r["server"], r["protocol"]) for r in path_rows} == both and data["request_path"]["source"] == "tiny"
    assert all(r["model"] == request_path.NAME and r["requests"] > 0 and r["errors"] == 0 and r["server_cores"] > 0
               for r in path_rows)
    assert "## The request path alone" in (tmp_path / "out" / "report.md").read_text()
    assert data["parity"]["tiny"]["top1_agreement"] == 1.0 and data["parity"]["tiny"]["max_abs_diff"] < 1e-5
    assert data["meta"]["triton"]["server"]["version"].startswith("2.")
    assert "Triton with its Python backend" in (tmp_path / "out" / "report.md").read_text()
