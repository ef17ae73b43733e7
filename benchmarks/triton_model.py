"""The Triton python-backend model the Triton comparison serves (`kestrel bench vs-triton`).

benchmarks/triton_repo.py copies this file, unchanged, to `<triton repository>/<model>/1/model.py`.
It runs Kestrel's own model.onnx (its absolute path is the config parameter `onnx_path`) in one
onnxruntime session set up exactly as Kestrel's onnxruntime backend sets up its sessions
(serve/backends/onnxruntime.py): every graph optimisation, the `WeightBiasQuantization` transformer
disabled, no spinning worker threads, the same intra-/inter-op thread counts (config parameters
`intra_op_thread_count` / `inter_op_thread_count`, 0 or absent = onnxruntime's default), the CPU
provider. Triton's dynamic batcher hands `execute` every request of one batch; their images are
concatenated into one array, run in ONE `session.run` and the probabilities split back per request:
what Kestrel's batcher does with the same requests. Like Kestrel, it runs one zero image through the
session before the model is ready (the input is uint8 images, as every Kestrel model's).

It imports nothing from Kestrel (it runs inside Triton's stub process, with the packages of
.venv-triton); onnxruntime and Triton's `triton_python_backend_utils` are imported when Triton
initialises the model, so this module also imports where neither exists (the tests give it fakes).
"""

import json

import numpy as np

# Kept in step with serve/backends/onnxruntime.py (tests/benchmarks/test_vs_triton.py checks it).
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def _parameters(config: dict) -> dict:
    return {key: (value or {}).get("string_value", "") for key, value in (config.get("parameters") or {}).items()}


def _count(parameters: dict, key: str) -> int:
    text = parameters.get(key, "") or "0"
    value = int(text)
    if value < 0:
        raise ValueError(f"parameter {key} is {text!r}; expected a whole number >= 0 (0 = onnxruntime's default)")
    return value


def session_options(ort, parameters: dict):
    """The SessionOptions Kestrel's onnxruntime backend would use with these thread counts."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    intra = _count(parameters, "intra_op_thread_count")
    inter = _count(parameters, "inter_op_thread_count")
    if intra:
        options.intra_op_num_threads = intra
    if inter:
        options.inter_op_num_threads = inter
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class TritonPythonModel:
    """Triton's python-backend interface: initialize(args), execute(requests), finalize()."""

    def initialize(self, args):
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        parameters = _parameters(config)
        path = parameters.get("onnx_path")
        if not path:
            raise ValueError(f"model {config.get('name')!r}: config.pbtxt has no parameter onnx_path")
        self.session = ort.InferenceSession(path, sess_options=session_options(ort, parameters),
                                            providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(DISABLED_OPTIMIZERS))
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.session_input = self.session.get_inputs()[0].name
        self.session_output = self.session.get_outputs()[0].name
        # Kestrel runs one zero image through every model before it reports it ready (Runner.warm_up:
        # allocations, kernel choice); so does this, or Triton's first requests would pay for it.
        dims = [int(d) if int(d) > 0 else 224 for d in config["input"][0]["dims"]]
        self.session.run([self.session_output], {self.session_input: np.zeros([1] + dims, dtype=np.uint8)})

    def execute(self, requests):
        pb = self.pb
        arrays = [pb.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        try:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            probabilities = self.session.run([self.session_output], {self.session_input: batch})[0]
            probabilities = np.asarray(probabilities, dtype=np.float32)
        except Exception as exc:  # onnxruntime raises its own types: every request gets the message
            error = pb.TritonError(f"onnxruntime failed on a batch of {sum(len(a) for a in arrays)}: {exc}")
            return [pb.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for array in arrays:
            end = start + len(array)
            tensor = pb.Tensor(self.output_name, np.ascontiguousarray(probabilities[start:end]))
            responses.append(pb.InferenceResponse(output_tensors=[tensor]))
            start = end
        return responses

    def finalize(self):
        self.session = None
