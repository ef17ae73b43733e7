"""Keras -> ONNX: the only module that touches tf2onnx.

The model is converted with its weights as *graph inputs*, not as constants.
Freezing a Keras model the usual way (tf2onnx.convert.from_keras, or a
tf.function that captures the variables) turns every weight into a constant
that TensorFlow's grappler then copies several times: VGG16 (138M parameters,
550 MB) needs more than 12 GB there. Instead:

1. a tf.function takes the uint8 image batch *and one tensor per variable* and
   runs `model.stateless_call(trainable, non_trainable, images)`; the graph
   tf2onnx freezes and optimises holds no large constants;
2. in the ONNX model, those weight inputs become initializers (numpy values
   from the Keras variables);
3. onnxruntime's *basic* offline optimisation (constant folding of the weight
   transposes, Conv+BatchNorm / Conv+Add fusion, identity removal; standard
   ONNX ops only) writes the final, self-contained model.

The result takes "images" (uint8, [N, H, W, 3], N dynamic) and returns
"probabilities" (float32, [N, classes]).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve._optional import require
from serve.errors import ConfigError, KestrelError

from . import _graph

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
PROTOBUF_LIMIT = 2_000_000_000  # bytes; larger models are saved with external data
STANDARD_DOMAINS = {"", "ai.onnx"}


class ConversionError(KestrelError):
    """tf2onnx (or the post-processing) could not convert the model."""


@dataclass
class ConversionResult:
    path: Path
    opset: int
    nodes: int
    parameters: int
    bytes: int


def _image_size(model) -> tuple[int, int]:
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1] is None or shape[2] is None or shape[3] != 3:
        raise ConfigError(f"expected a model taking [N, H, W, 3] images, got input shape {shape}")
    return int(shape[1]), int(shape[2])


def convert(model, path: str | Path, *, opset: int | None = None, optimize: bool = True) -> ConversionResult:
    """Convert a Keras model that already follows the contract (uint8 "images" in) to ONNX at `path`."""
    tf = require("tensorflow", "exporting to ONNX")
    tf2onnx = require("tf2onnx", "exporting to ONNX")
    onnx = require("onnx", "exporting to ONNX")
    from onnx import numpy_helper

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)

    height, width = _image_size(model)
    trainable = list(model.trainable_variables)
    non_trainable = list(model.non_trainable_variables)
    variables = trainable + non_trainable
    n_trainable = len(trainable)
    weight_specs = [
        tf.TensorSpec(tuple(v.shape), tf.as_dtype(v.dtype), name=f"kestrel_weight_{i}")
        for i, v in enumerate(variables)
    ]
    image_spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name=INPUT_NAME)

    def forward(images, *weights):
        outputs, _ = model.stateless_call(list(weights[:n_trainable]), list(weights[n_trainable:]), images,
                                          training=False)
        if isinstance(outputs, (list, tuple)):
            if len(outputs) != 1:
                raise ConfigError(f"expected one model output, got {len(outputs)}")
            outputs = outputs[0]
        return {OUTPUT_NAME: tf.cast(outputs, tf.float32)}

    function = tf.function(forward, input_signature=[image_spec, *weight_specs], autograph=False)
    # Tensors the graph captures from Python (e.g. Normalization's mean/variance constants) also become
    # placeholders of the traced function; tf2onnx makes them graph inputs, turned into initializers below.
    concrete = function.get_concrete_function(image_spec, *weight_specs)
    captured = {}
    if concrete.captured_inputs:
        for placeholder, value in zip(concrete.inputs[-len(concrete.captured_inputs):], concrete.captured_inputs):
            if value.dtype != tf.resource:
                captured[placeholder.name.split(":")[0]] = value
    try:
        model_proto, _ = tf2onnx.convert.from_function(
            function, input_signature=[image_spec, *weight_specs], opset=opset
        )
    except KestrelError:
        raise
    except Exception as exc:  # tf2onnx raises a variety of types
        raise ConversionError(f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}") from exc

    # Weight inputs -> initializers.
    values = {f"kestrel_weight_{i}": v for i, v in enumerate(variables)}
    graph = model_proto.graph
    keep_inputs = []
    total = 0
    for inp in list(graph.input):
        base = inp.name.split(":")[0]
        if base in values or base in captured:
            array = np.asarray((values.get(base) if base in values else captured[base]).numpy())
            total += array.size
            tensor = numpy_helper.from_array(array, name=inp.name)
            graph.initializer.append(tensor)
        else:
            keep_inputs.append(inp)
    del graph.input[:]
    graph.input.extend(keep_inputs)
    keep_inputs = inp = None  # sub-message references would keep the whole proto alive
    _rename_io(graph)
    _graph.drop_unused_initializers(graph)  # else onnxruntime warns about each one whenever it loads the model
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ConversionError(
            f"unexpected ONNX interface: inputs {[i.name for i in graph.input]}, "
            f"outputs {[o.name for o in graph.output]}; expected ['{INPUT_NAME}'] -> ['{OUTPUT_NAME}']"
        )
    _set_dims(graph)
    used_opset = next((o.version for o in model_proto.opset_import if o.domain in STANDARD_DOMAINS), 0)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nodes = len(graph.node)
    if not optimize:
        _save(onnx, model_proto, path)
    else:
        large = model_proto.ByteSize() > PROTOBUF_LIMIT
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as tmp:
            raw = Path(tmp) / "raw.onnx"
            _save(onnx, model_proto, raw)
            del model_proto, graph  # the file is the only copy now: keeps the peak memory down
            nodes = _optimize_basic(raw, path, large=large)
    onnx.checker.check_model(str(path))
    return ConversionResult(path=path, opset=int(used_opset), nodes=nodes, parameters=int(total),
                            bytes=path.stat().st_size)


def _rename_io(graph) -> None:
    """tf2onnx names tensors 'images:0' / 'Identity:0' in some versions: give them the contract names."""
    renames = {}
    for inp in graph.input:
        if inp.name.split(":")[0] == INPUT_NAME and inp.name != INPUT_NAME:
            renames[inp.name] = INPUT_NAME
    if len(graph.output) == 1 and graph.output[0].name != OUTPUT_NAME:
        renames[graph.output[0].name] = OUTPUT_NAME
    if not renames:
        return
    for value in list(graph.input) + list(graph.output):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]


def _set_dims(graph) -> None:
    """A symbolic batch dimension named 'N' on input and output (dynamic batch)."""
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"


def _save(onnx, model_proto, path: Path) -> None:
    if model_proto.ByteSize() > PROTOBUF_LIMIT:
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model_proto, str(path))


def _optimize_basic(raw: Path, path: Path, *, large: bool) -> int:
    """Constant-fold the weight transposes and fuse BatchNorm with onnxruntime's basic level; returns node count.

    Basic-level rewrites produce standard ONNX operators only; the result is
    checked for that before it is written to `path`.
    """
    ort = require("onnxruntime", "optimising the exported ONNX model")
    onnx = require("onnx", "exporting to ONNX")
    optimized_path = raw.with_name("optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized_path)
    if large:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized_path.name + ".data")
    session = ort.InferenceSession(str(raw), sess_options=options, providers=["CPUExecutionProvider"])
    del session
    optimized = onnx.load(str(optimized_path))
    domains = {node.domain for node in optimized.graph.node}
    if not domains <= STANDARD_DOMAINS:
        raise ConversionError(f"onnxruntime's basic optimisation introduced non-standard operator domains {domains}")
    _set_dims(optimized.graph)  # the contract's symbolic batch dimension, whatever onnxruntime wrote
    _save(onnx, optimized, path)
    return len(optimized.graph.node)


def opset_of(path: str | Path) -> int:
    onnx = require("onnx", "reading an ONNX model")
    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
