"""No "Removing initializer ... It is not used by any node" from onnxruntime: export writes no unused initializer,
and the offline tools keep onnxruntime's own log at ERROR unless --verbose (issues #22, #26)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _model_with_unused_initializer(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y],
                              initializer=[numpy_helper.from_array(np.ones(3, np.float32), "left_behind")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_drop_unused_initializers_keeps_what_nodes_and_subgraphs_read():
    from onnx import TensorProto, helper, numpy_helper

    from export import _graph

    then_out = helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [3])
    else_out = helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [3])
    then_graph = helper.make_graph([helper.make_node("Identity", ["in_subgraph"], ["then_y"])], "then", [], [then_out])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["else_y"])], "else", [], [else_out])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["s"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [3])],
        initializer=[numpy_helper.from_array(np.ones(3, np.float32), name)
                     for name in ("bias", "in_subgraph", "folded_away", "also_unused")])
    assert _graph.drop_unused_initializers(graph) == ["also_unused", "folded_away"]
    assert [i.name for i in graph.initializer] == ["bias", "in_subgraph"]
    assert _graph.drop_unused_initializers(graph) == []


def test_export_of_a_normalization_head_writes_no_unused_initializer_and_prints_no_warning(tmp_path, capfd):
    """tf2onnx leaves Normalization's folded constant ('head_normalize_1/Sqrt/x:0') as an initializer no node
    reads; onnxruntime warned about it, in colour, at every export of a trained model."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import keras
    import onnx

    from export import keras_to_onnx

    images = keras.Input((8, 8, 3), dtype="uint8", name="images")
    x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"))(images)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Normalization(mean=np.ones(3, np.float32), variance=np.full(3, 4.0, np.float32),
                                   name="head_normalize")(x)
    model = keras.Model(images, keras.layers.Dense(3, activation="softmax")(x))
    capfd.readouterr()
    result = keras_to_onnx.convert(model, tmp_path / "model.onnx")
    err = capfd.readouterr().err
    assert "Removing initializer" not in err and "not used by any node" not in err
    graph = onnx.load(str(result.path)).graph
    read = {name for node in graph.node for name in node.input}
    assert all(init.name in read for init in graph.initializer)


_SESSION = """
import sys
from serve import console
if sys.argv[1] == "quiet":
    console.quiet_onnxruntime_logs()
import onnxruntime
onnxruntime.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
print("loaded")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_offline_tools_keep_onnxruntime_warnings_off_unless_verbose(tmp_path, verbose):
    pytest.importorskip("onnxruntime")
    model = _model_with_unused_initializer(tmp_path / "m.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KESTREL_VERBOSE", None)
    if verbose:
        env["KESTREL_VERBOSE"] = "1"
    run = [sys.executable, "-c", _SESSION]
    quiet = subprocess.run([*run, "quiet", str(model)], env=env, capture_output=True, text=True, timeout=120)
    plain = subprocess.run([*run, "plain", str(model)], env=env, capture_output=True, text=True, timeout=120)
    assert quiet.stdout.strip() == plain.stdout.strip() == "loaded"
    assert "Removing initializer 'left_behind'" in plain.stderr  # onnxruntime's own default: the warning
    assert ("Removing initializer 'left_behind'" in quiet.stderr) == verbose
