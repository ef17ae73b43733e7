"""Real TensorRT: build engines from the tiny ONNX classifier, run them, compare with onnxruntime.

Marked gpu: skipped (with the reason) without TensorRT and an NVIDIA GPU, which is the case on
the development machines and in CI here. NOT RUN on the machine these modules were written on.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_helpers import SIZE, image_folder, tiny_onnx, tiny_repo  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 2e-2), ("int8", 6e-2)])
def test_engine_builds_runs_and_matches_onnxruntime(tiny_repo, image_folder, precision, tolerance):
    from export import quantize as quant
    from export.optimize import optimize
    from serve.backends import create_runner
    from serve.images import synthetic_images
    from serve.repository import ModelRepository

    reports = optimize(tiny_repo, "tiny", precisions=precision, calibration=image_folder, engine_only=True,
                       quantize_options=quant.QuantizeOptions(min_images=16), min_batch=1, opt_batch=2, max_batch=4,
                       workspace_mb=256, latency_runs=5, progress=False, log=lambda *_: None)
    name = f"tiny_trt_{precision}"
    assert reports[name].passed
    repo = ModelRepository(tiny_repo)
    entry = repo.entry(name)
    assert entry.platform == "tensorrt_plan" and entry.max_batch_size == 4
    sidecar = json.loads((tiny_repo / name / "1" / "model.plan.json").read_text())
    assert sidecar["precision"] == precision and sidecar["profile"] == {"min": 1, "opt": 2, "max": 4}
    assert list((tiny_repo / ".tensorrt").glob("timing-*.cache"))

    x = synthetic_images(3, SIZE, seed=5)
    with create_runner(repo.entry("tiny")) as reference, create_runner(entry) as engine:
        expected = reference.infer(x)
        got = engine.infer(x)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.max(np.abs(got - expected)) < tolerance
        assert np.array_equal(engine.infer(x[:1]), engine.infer(x[:1]))  # batch 1 within the profile


def test_engine_from_another_gpu_is_refused(tiny_repo):
    from export.optimize import optimize
    from serve.backends import create_runner
    from serve.errors import EngineMismatchError
    from serve.repository import ModelRepository

    optimize(tiny_repo, "tiny", precisions="fp16", engine_only=True, max_batch=4, workspace_mb=256,
             latency_runs=0, progress=False, log=lambda *_: None, min_agreement=0.0)
    sidecar = tiny_repo / "tiny_trt_fp16" / "1" / "model.plan.json"
    data = json.loads(sidecar.read_text())
    data["compute_capability"] = "1.0"
    sidecar.write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match="compute capability 1.0"):
        create_runner(ModelRepository(tiny_repo).entry("tiny_trt_fp16")).load()
