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
