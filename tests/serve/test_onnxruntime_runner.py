"""The Runner contract (checks before inference) on the onnxruntime backend, with a tiny ONNX model."""

import numpy as np
import pytest

from serve import repository as repo
from serve.backends import create_runner
from serve.errors import InvalidInputError, ModelLoadError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def tiny_classifier(path, size=8, classes=4):
    """uint8 NHWC -> mean over pixels -> (3 x classes) matmul -> softmax."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.arange(3 * classes, dtype=np.float32).reshape(3, classes) / 100.0
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([1, 2], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path)
    return weights


@pytest.fixture
def entry(tmp_path):
    folder = tmp_path / "tiny"
    (folder / "1").mkdir(parents=True)
    weights = tiny_classifier(folder / "1" / "model.onnx")
    config = repo.make_config(
        "tiny", repo.PLATFORM_ONNX, repo.TensorSpec("images", np.uint8, (8, 8, 3)),
        repo.TensorSpec("probabilities", np.float32, (4,)), max_batch_size=4,
    )
    repo.write_config(config, folder)
    (folder / "labels.txt").write_text("a\nb\nc\nd\n")
    return repo.ModelRepository(tmp_path).entry("tiny"), weights


def test_infer_matches_numpy(entry):
    entry, weights = entry
    runner = create_runner(entry)
    assert not runner.loaded  # cheap constructor
    batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    out = runner.infer(batch)
    logits = batch.astype(np.float32).mean(axis=(1, 2)) @ weights
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert runner.labels == ["a", "b", "c", "d"]
    assert "CPUExecutionProvider" in runner.providers
    runner.close()
    assert not runner.loaded


@pytest.mark.parametrize(
    "batch, message",
    [
        (np.zeros((1, 8, 8, 3), np.float32), "received dtype float32, expected uint8"),
        (np.zeros((1, 9, 8, 3), np.uint8), r"received shape \(1, 9, 8, 3\), expected \('N', 8, 8, 3\)"),
        (np.zeros((8, 8, 3), np.uint8), "received shape"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty batch"),
        (np.zeros((5, 8, 8, 3), np.uint8), "at most max_batch_size=4"),
        ([[1, 2]], "expected a numpy array, received list"),
    ],
)
def test_bad_batches_are_refused_before_inference(entry, batch, message):
    runner = create_runner(entry[0])
    with pytest.raises(InvalidInputError, match=message):
        runner.infer(batch)
    assert not runner.loaded  # the check ran before anything was allocated


def test_corrupt_model_file_is_a_load_error(entry):
    entry, _ = entry
    entry.artifact().write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        create_runner(entry).load()


def _with_parameters(entry, parameters: dict[str, str]):
    config = repo.make_config(
        "tiny", repo.PLATFORM_ONNX, repo.TensorSpec("images", np.uint8, (8, 8, 3)),
        repo.TensorSpec("probabilities", np.float32, (4,)), max_batch_size=4, parameters=parameters,
    )
    repo.write_config(config, entry.path)
    return repo.ModelRepository(entry.path.parent).entry("tiny")


def test_config_thread_counts_override_the_server_option(entry):
    entry = _with_parameters(entry[0], {"intra_op_thread_count": "1", "inter_op_thread_count": "1"})
    runner = create_runner(entry, intra_op_threads=2)  # the server-wide --ort-threads
    assert (runner.intra_op_threads, runner.inter_op_threads) == (1, 1)
    runner.load()
    assert runner.session.get_session_options().intra_op_num_threads == 1
    runner.close()


def test_server_option_applies_when_the_config_is_silent(entry):
    runner = create_runner(entry[0], intra_op_threads=2)
    runner.load()
    assert runner.session.get_session_options().intra_op_num_threads == 2
    runner.close()


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_bad_thread_count_names_the_parameter(entry, value):
    entry = _with_parameters(entry[0], {"intra_op_thread_count": value})
    with pytest.raises(ModelLoadError, match=rf"parameter intra_op_thread_count is '{value}' in config.pbtxt; "
                                             r"expected a whole number >= 0"):
        create_runner(entry)


def _float_conv_between_qdq(path, size=6):
    """uint8 NHWC -> Q/DQ -> a float depthwise Conv (channels 1000x apart in scale) -> Q/DQ -> flat output.

    onnxruntime's WeightBiasQuantization transformer quantizes such a float Conv's
    weights per tensor, wiping out the small channels."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = (rng.normal(0, 1, (3, 1, 3, 3)) * np.array([1e-3, 3e-2, 1.0])[:, None, None, None]).astype(np.float32)
    init = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b"),
            numpy_helper.from_array(np.array(1 / 255, np.float32), "in_scale"),
            numpy_helper.from_array(np.array(2.0, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z"),
            numpy_helper.from_array(np.array(1e-3, np.float32), "s2"), numpy_helper.from_array(np.array(128, np.uint8), "z2"),
            numpy_helper.from_array(np.array([0, -1], np.int64), "flat")]
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("QuantizeLinear", ["nchw", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Conv", ["xd", "w", "b"], ["y"], group=3, pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["y", "s2", "z2"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s2", "z2"], ["yd"]),
        helper.make_node("Reshape", ["yd", "flat"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes, "float_conv_in_qdq",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3 * size * size])],
        initializer=init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.save(model, path)


def test_float_layers_inside_an_int8_model_keep_their_float_weights(tmp_path):
    import onnxruntime as ort

    folder = tmp_path / "mixed"
    (folder / "1").mkdir(parents=True)
    _float_conv_between_qdq(folder / "1" / "model.onnx")
    repo.write_config(repo.make_config("mixed", repo.PLATFORM_ONNX, repo.TensorSpec("images", np.uint8, (6, 6, 3)),
                                       repo.TensorSpec("probabilities", np.float32, (108,)), max_batch_size=4), folder)
    (folder / "labels.txt").write_text("".join(f"out_{i}\n" for i in range(108)))
    batch = np.random.default_rng(1).integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)

    def reference(level, disabled=()):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(folder / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(disabled))
        return session.run(None, {"images": batch})[0]

    exact = reference(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # the model's own Q/DQ arithmetic
    rewritten = reference(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)  # onnxruntime's defaults
    assert np.abs(rewritten - exact).max() > 5e-3  # the transformer does change this model (the hazard is real)
    runner = create_runner(repo.ModelRepository(tmp_path).entry("mixed"))
    np.testing.assert_allclose(runner.infer(batch), exact, atol=1e-6)
    runner.close()


def test_adaptive_threads_run_busy_batches_in_a_one_thread_session(entry, monkeypatch):
    """Config parameter adaptive_threads (a runner made in process: off unless asked; served: see below): a
    second session on half the cores (one of two) for batches that run while others do; the batcher gives
    the runner two workers; both sessions answer the same."""
    from serve.backends.onnxruntime import OnnxRuntimeRunner
    from serve.batching import DynamicBatcher

    entry, _ = entry
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.delenv("KESTREL_ORT_THREADS", raising=False)
    assert create_runner(entry).preferred_workers == 1  # off in a runner made in process
    entry.config.parameters["adaptive_threads"].string_value = "true"
    runner = create_runner(entry).load()
    assert isinstance(runner, OnnxRuntimeRunner) and runner.adaptive and runner.preferred_workers == 2
    assert runner._narrow is not None and runner._narrow is not runner.session
    batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(runner.run(batch, busy=True), runner.run(batch), rtol=1e-6)
    assert DynamicBatcher(runner).workers == 2
    runner.close()
    assert runner._narrow is None and runner.session is None
    entry.config.parameters["adaptive_threads"].string_value = "maybe"
    with pytest.raises(ModelLoadError, match="adaptive_threads"):
        create_runner(entry)
    entry.config.parameters["adaptive_threads"].string_value = "true"
    entry.config.parameters["intra_op_thread_count"].string_value = "1"  # an explicit thread count wins
    assert not create_runner(entry).adaptive


def test_served_onnxruntime_models_get_adaptive_threads_unless_turned_off(entry, monkeypatch):
    """The server (ModelHub) turns adaptive threads on for onnxruntime models; serve's
    --no-ort-adaptive-threads (runner option) and a model's config parameter "false" turn it off."""
    from serve.__main__ import build_parser
    from serve.hub import ModelHub

    entry, _ = entry
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.delenv("KESTREL_ORT_THREADS", raising=False)

    def served(**options):
        hub = ModelHub(entry.path.parent, ["tiny"], **options).load()
        try:
            with hub.acquire("tiny") as handle:
                version = handle.versions[0]
                return version.runner.adaptive, version.batcher.workers
        finally:
            hub.close()

    assert served() == (True, 2)
    assert served(runner_options={"onnxruntime_onnx": {"adaptive_threads": False}}) == (False, 1)
    assert build_parser().parse_args([]).ort_adaptive_threads is True
    assert build_parser().parse_args(["--no-ort-adaptive-threads"]).ort_adaptive_threads is False
    entry.config.parameters["adaptive_threads"].string_value = "false"
    repo.write_config(entry.config, entry.path)
    assert served() == (False, 1)
