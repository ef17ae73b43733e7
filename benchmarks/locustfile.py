"""Locust load for Kestrel's gRPC APIs: KServe V2 ModelInfer and Classify.

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 --run-time 30s \\
        --host 127.0.0.1:8001 --kestrel-api classify --kestrel-model mobilenet_v2

Options (each also an environment variable, e.g. KESTREL_API=infer):

    --kestrel-api       infer (V2 ModelInfer, a uint8 batch in raw_input_contents)
                        | classify (kestrel.v1 Classify, the image file's bytes)
    --kestrel-model     model(s) to call, comma-separated: requests go round-robin
                        over them, each timed under its own name. For classify,
                        "a+b" sends one request naming both (fused answer).
    --kestrel-images    folder of images (default ../shared/photos, else synthetic)
    --kestrel-encode    jpeg (default: other formats re-encoded to JPEG once) | asis
    --kestrel-batch     images per ModelInfer request (default 1)
    --kestrel-top-k     Classify's top_k (default 5)
    --kestrel-deadline  per-call gRPC deadline in seconds (default 30)
    --kestrel-warmup    seconds not measured at the start (default 0)
    --kestrel-record    JSON file for the raw measured samples
    --host              the server's address host:port (or KESTREL_ADDRESS)

Every call is timed into locust's request events (request_type "grpc", name
"infer:<model>" or "classify:<model>"), so locust's statistics, CSVs and UI
work as for HTTP. grpc runs on gevent (init_gevent below, before any channel
exists): without it each blocking call stalls every other user in the process.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np

grpc_gevent.init_gevent()  # before any grpc object is created

from locust import User, events, task  # noqa: E402

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _loadgen  # noqa: E402

from serve._proto import grpc_service_pb2 as v2  # noqa: E402
from serve._proto import grpc_service_pb2_grpc as v2_grpc  # noqa: E402
from serve._proto import kestrel_pb2, kestrel_pb2_grpc  # noqa: E402

APIS = ("infer", "classify")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a batch of 32 FP32 299x299x3 images is 34 MB


@events.init_command_line_parser.add_listener
def _arguments(parser):
    _loadgen.add_common_arguments(parser)
    group = parser.add_argument_group("kestrel gRPC")
    group.add_argument("--kestrel-api", env_var="KESTREL_API", default="classify", choices=APIS,
                       help="infer (V2 ModelInfer, uint8 batch) or classify (image bytes); default classify")
    group.add_argument("--kestrel-model", env_var="KESTREL_MODEL", default="mobilenet_v2",
                       help="model name(s), comma-separated; for classify 'a+b' asks for both in one request")
    group.add_argument("--kestrel-batch", env_var="KESTREL_BATCH", type=int, default=1,
                       help="images per ModelInfer request (default 1)")
    group.add_argument("--kestrel-top-k", env_var="KESTREL_TOP_K", type=int, default=5,
                       help="top_k for Classify (default 5)")
    group.add_argument("--kestrel-deadline", env_var="KESTREL_DEADLINE", type=float, default=30.0,
                       help="per-call deadline in seconds (default 30)")
    group.add_argument("--kestrel-address", env_var="KESTREL_ADDRESS", default="",
                       help="server host:port (default: --host, else 127.0.0.1:8001)")


_loadgen.install_recorder()


class _InferTarget:
    """A V2 ModelInfer request for one model, built once from the model's metadata."""

    def __init__(self, stub, model: str, batch: int, folder: str, deadline: float, offset: int):
        meta = stub.ModelMetadata(v2.ModelMetadataRequest(name=model), timeout=deadline)
        if len(meta.inputs) != 1:
            raise RuntimeError(f"model {model!r} has {len(meta.inputs)} inputs; expected 1 image input")
        tensor = meta.inputs[0]
        shape = list(tensor.shape)  # [-1, H, W, 3]
        if tensor.datatype != "UINT8" or len(shape) != 4:
            raise RuntimeError(f"model {model!r} input {tensor.name}: {tensor.datatype} {shape}; "
                               "expected UINT8 [-1, H, W, 3]")
        arrays = _loadgen.image_arrays(folder, (int(shape[1]), int(shape[2])))
        picks = [arrays[(offset + i) % len(arrays)] for i in range(batch)]
        data = np.ascontiguousarray(np.stack(picks))
        self.images = batch
        self.request = v2.ModelInferRequest(
            model_name=model,
            inputs=[v2.ModelInferRequest.InferInputTensor(name=tensor.name, datatype="UINT8",
                                                          shape=list(data.shape))],
            outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name=o.name) for o in meta.outputs],
            raw_input_contents=[data.tobytes()],
        )
        self.name = f"infer:{model}"

    def check(self, response) -> None:
        if not response.outputs or not response.raw_output_contents:
            raise RuntimeError("ModelInfer returned no output tensor")
        if response.outputs[0].shape and response.outputs[0].shape[0] != self.images:
            raise RuntimeError(f"ModelInfer returned shape {list(response.outputs[0].shape)} "
                               f"for a batch of {self.images}")


class KestrelUser(User):
    """One client: its own channel, sending back-to-back requests (no think time)."""

    def __init__(self, environment):
        super().__init__(environment)
        options = environment.parsed_options
        self.api = options.kestrel_api
        self.deadline = float(options.kestrel_deadline)
        self.top_k = int(options.kestrel_top_k)
        self.batch = max(1, int(options.kestrel_batch))
        self.folder = options.kestrel_images
        self.models = [m.strip() for m in options.kestrel_model.split(",") if m.strip()]
        if not self.models:
            raise ValueError("--kestrel-model is empty")
        address = options.kestrel_address or (self.host or "").replace("grpc://", "") or "127.0.0.1:8001"
        self.address = address
        self.channel = None
        self._cycle = None

    def on_start(self):
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        grpc.channel_ready_future(self.channel).result(timeout=self.deadline)
        offset = _loadgen.next_user()
        if self.api == "infer":
            stub = v2_grpc.GRPCInferenceServiceStub(self.channel)
            self.call = stub.ModelInfer
            targets = [_InferTarget(stub, m, self.batch, self.folder, self.deadline, offset * self.batch)
                       for m in self.models]
            self._cycle = itertools.cycle(targets)
        else:
            stub = kestrel_pb2_grpc.ClassifierStub(self.channel)
            self.call = stub.Classify
            files = _loadgen.image_files(self.folder, options_encode(self.environment))
            requests = []
            for _, data in _loadgen.rotated(files, offset):
                for model in self.models:
                    names = _loadgen.model_names(model)
                    requests.append((f"classify:{model}", kestrel_pb2.ClassifyRequest(
                        image=data, models=names, top_k=self.top_k)))
            self._cycle = itertools.cycle(requests)

    def on_stop(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    @task
    def request(self):
        if self.api == "infer":
            target = next(self._cycle)
            name, message, images, check = target.name, target.request, target.images, target.check
        else:
            name, message = next(self._cycle)
            images, check = 1, _check_classify
        exception = None
        length = 0
        start = time.perf_counter()
        try:
            response = self.call(message, timeout=self.deadline)
            elapsed = (time.perf_counter() - start) * 1000.0
            check(response)
            length = response.ByteSize()
        except grpc.RpcError as exc:
            elapsed = (time.perf_counter() - start) * 1000.0
            exception = RuntimeError(f"{exc.code().name}: {exc.details()}")
        except RuntimeError as exc:
            elapsed = (time.perf_counter() - start) * 1000.0
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=elapsed, response_length=length,
            exception=exception, context={"images": images},
        )


def options_encode(environment) -> str:
    return getattr(environment.parsed_options, "kestrel_encode", "jpeg")


def _check_classify(response) -> None:
    if not response.results or not response.results[0].predictions:
        raise RuntimeError("Classify returned no predictions")

