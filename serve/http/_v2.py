"""KServe V2 over HTTP/JSON, the codec: a request body (JSON "data", or the binary tensor data
extension) -> serve.dataplane.InferRequest, and its InferResponse -> JSON (+ binary outputs).
Also the JSON shape of a Classify answer. Runs in a worker thread: parsing is CPU work."""

from __future__ import annotations

import json

from starlette.responses import Response

from ..dataplane import DataPlane, InferInput, InferRequest, RequestedOutput, bytes_tensor, flag
from ..ensemble import FUSIONS
from ..errors import InvalidInputError, shown
from ..hub import ClassifyResult

HEADER_LENGTH = "Inference-Header-Content-Length"


def loads(data: bytes | memoryview, what: str, optional: bool = False):
    """JSON -> Python; a body that is not JSON, or nested too deeply to parse, is InvalidInputError."""
    text = data if isinstance(data, bytes) else bytes(data)
    if not text or text.isspace():
        if optional:
            return None
        raise InvalidInputError(f"received an empty body; expected {what} as JSON")
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidInputError(f"received JSON nested too deeply to parse; expected {what}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"received a body that is not valid JSON ({shown(str(exc))[1:-1]}); "
                                f"expected {what}") from None


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"received {what} that is not a JSON object")
    return value


def request_from_json(model: str, version: str, body: bytes, header_length: str | None,
                      started: float) -> tuple[InferRequest, dict, bool]:
    """(the InferRequest, the JSON request, the binary_data_output default) of a V2 HTTP infer body."""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidInputError(
                f"received {HEADER_LENGTH}: {shown(header_length)} with a body of {len(body)} bytes; expected the "
                "length of the JSON header, at most the body's length"
            )
        split = int(header_length)
    else:
        split = len(body)
    view = memoryview(body)
    request = loads(body if split == len(body) else view[:split], "a V2 inference request")  # JSON alone: no copy
    if not isinstance(request, dict):
        raise InvalidInputError(f"received a JSON {type(request).__name__}; expected a V2 inference request "
                                "object with \"inputs\"")
    parameters = _object(request.get("parameters"), "request \"parameters\"")
    binary = view[split:]
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not all(isinstance(t, dict) for t in raw_inputs):
        raise InvalidInputError(f"model '{model}': received \"inputs\" {shown(raw_inputs)}; expected a list of "
                                "tensor objects")
    inputs, offset = [], 0
    for tensor in raw_inputs:
        params = _object(tensor.get("parameters"), f"input {shown(tensor.get('name'))} \"parameters\"")
        item = InferInput(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), source="\"data\"",
                          hint="\"data\" (a list of numbers) or parameters.binary_data_size with the binary "
                               "tensor data extension")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInputError(
                    f"model '{model}' input {shown(tensor.get('name'))}: received binary_data_size {shown(size)}; "
                    "expected a number of bytes"
                )
            # short data: the tensor check reports received vs expected bytes
            item.raw, item.source = binary[offset:offset + size], "binary data after the JSON header"
            offset += size
        elif "data" in tensor:
            item.values = tensor["data"]
        inputs.append(item)
    if offset < len(binary):
        raise InvalidInputError(
            f"model '{model}': received {len(binary)} bytes of binary data after the JSON header; the inputs' "
            f"binary_data_size add up to {offset}"
        )
    binary_default = flag(parameters.get("binary_data_output", False), "binary_data_output")
    wanted = request.get("outputs")
    if wanted is None:
        wanted = []
    if not isinstance(wanted, list) or not all(isinstance(w, dict) for w in wanted):
        raise InvalidInputError("received \"outputs\" that is not a list of objects; expected [{\"name\": ...}]")
    outputs = []
    for out in wanted:
        params = _object(out.get("parameters"), f"output {shown(out.get('name'))} \"parameters\"")
        classes = params.get("classification", 0)
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
            raise InvalidInputError(f"received classification={shown(classes)}; expected a number of classes >= 0")
        outputs.append(RequestedOutput(out.get("name"), classes,
                                       {"binary_data": flag(params.get("binary_data", binary_default),
                                                            "binary_data")}))
    fusion = parameters.get("fusion")
    if fusion is not None and not isinstance(fusion, str):
        raise InvalidInputError(f"received fusion={shown(fusion)}; expected one of {', '.join(FUSIONS)}")
    deadline = None
    if "timeout" in parameters:  # tritonclient's server-side timeout, in microseconds
        timeout = parameters["timeout"]
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidInputError(f"received timeout={shown(timeout)}; expected a positive number of microseconds")
        deadline = started + timeout / 1e6
    request_id = request.get("id", "")
    return (InferRequest(model, version, inputs, outputs, request_id if isinstance(request_id, str) else "",
                         fusion, deadline), request, binary_default)


def infer(plane: DataPlane, scope, model: str, version: str, body: bytes, header_length: str | None,
          started: float) -> Response:
    """One V2 HTTP infer in a worker thread: decode, run through the data plane in the request's scope
    (its target already acquired), encode (JSON, or JSON + binary outputs)."""
    request, raw, binary_default = request_from_json(model, version, body, header_length, started)
    answer = plane.infer(request, scope)
    outputs, chunks = [], []
    for out in answer.outputs:
        item = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        binary = out.parameters.get("binary_data", binary_default)
        if binary:
            data = bytes_tensor(out.data) if out.datatype == "BYTES" else out.data.tobytes()
            item["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif out.datatype == "BYTES":
            item["data"] = [v.decode() for v in out.data.ravel()]
        else:
            item["data"] = out.data.ravel().tolist()
        outputs.append(item)
    body_out = {"model_name": answer.model_name, "model_version": answer.model_version, "outputs": outputs}
    if "id" in raw:
        body_out["id"] = raw["id"]
    header = json.dumps(body_out, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, 200, None, "application/json")
    return Response(b"".join([header, *chunks]), 200, {HEADER_LENGTH: str(len(header))}, "application/octet-stream")


def _predictions(items) -> list[dict]:
    return [{"label": label, "index": int(index), "probability": float(p)} for label, index, p in items]


def classify(plane: DataPlane, scope, image: bytes, names: list[str], top: int, fusion: str,
             filename: str | None) -> Response:
    """One Classify over HTTP in a worker thread: classify in the request's scope, then encode the JSON
    answer (once)."""
    result = plane.classify(image, names, top, fusion, None, scope)
    body = json.dumps(classify_json(result, filename, len(image)), separators=(",", ":")).encode()
    return Response(body, 200, None, "application/json")


def classify_json(result: ClassifyResult, filename: str | None, size: int) -> dict:
    return {
        "image": {"filename": filename, "bytes": size, "height": result.image_size[0],
                  "width": result.image_size[1]},
        "decode_ms": result.decode_s * 1e3,
        "total_ms": result.total_s * 1e3,
        "models": [{"model": a.model, "version": a.version, "predictions": _predictions(a.predictions),
                    "queue_ms": a.run.queue_s * 1e3, "compute_ms": a.run.compute_s * 1e3,
                    "latency_ms": (a.run.queue_s + a.run.compute_s) * 1e3, "batch_size": a.run.batch_size,
                    "input_size": list(a.input_size)} for a in result.models],
        "ensembles": [{"name": e.name, "fusion": e.fusion, "members": e.members,
                       "predictions": _predictions(e.predictions)} for e in result.ensembles],
    }


__all__ = ["HEADER_LENGTH", "classify", "classify_json", "flag", "infer", "loads", "request_from_json"]
