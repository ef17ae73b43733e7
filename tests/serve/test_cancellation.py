"""A request whose client went away is dropped, on both transports: while it waits in the
batcher's queue it never reaches the model; once running, its result is discarded; nothing is
logged above debug and the server goes on answering.

Deterministic: the model is gated (a test double around the fake runner's _infer blocks until
the test opens the gate), so "the model is busy" and "the request is queued" are states the test
waits for (bounded polls), not durations it hopes for.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading

import numpy as np
import pytest

from serve_helpers import Gate, png_bytes, wait_for

PICTURE = np.random.default_rng(11).integers(0, 256, (40, 50, 3), dtype=np.uint8)
IMAGE = png_bytes(PICTURE)
TENSOR_HEADER = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                        "parameters": {"binary_data_size": 32 * 32 * 3}}]}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """gRPC + HTTP over one fake model 'gate' (32x32, batch 1, one worker, no queue delay)."""
    from serve import create_server
    from serve.backends.fake import write_fake_model

    repo = tmp_path_factory.mktemp("cancel_repo")
    write_fake_model(repo, "gate", classes=3, thread_safe=False, max_batch_size=1, max_queue_delay_us=0)
    srv, _ = create_server(repo, port=0, http_port=0)
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture
def gate(server):
    served = server.hub.models["gate"]
    gate = Gate(served.runner)
    yield gate
    gate.restore()
    wait_for(lambda: served.batcher._outstanding == 0, "the batcher to be idle")


@pytest.fixture
def quiet(caplog):
    """Records of every logger from DEBUG up; the test asserts none is above DEBUG."""
    caplog.set_level(logging.DEBUG)
    return caplog


def loud(caplog) -> list[str]:
    """Records above DEBUG, but uvicorn's access log: the server turns it off (non-propagating, no
    handler), and pytest's capture attaches handlers to non-propagating loggers, turning it on."""
    return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records
            if r.levelno > logging.DEBUG and r.name != "uvicorn.access"]


def failures(server, reason: str = "CANCELED") -> int:
    return server.hub.metrics.model("gate", "1").snapshot()["fail_reasons"].get(reason, 0)


# ---- the transports: a good request, and one whose client will go away -----------------------
def http_request(kind: str) -> bytes:
    if kind == "classify":
        return (b"POST /v1/classify?models=gate HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(IMAGE)}\r\n\r\n".encode() + IMAGE)
    return (b"POST /v2/models/gate/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            + f"Inference-Header-Content-Length: {len(TENSOR_HEADER)}\r\n".encode()
            + f"Content-Length: {len(TENSOR_HEADER) + 3072}\r\n\r\n".encode() + TENSOR_HEADER + bytes(3072))


class HttpTransport:
    def __init__(self, server, kind, leave="close"):
        self.port, self.kind, self.leave = server.http_port, kind, leave
        self.sockets = []

    def good(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            raw = http_request(self.kind)
            head, _, body = raw.partition(b"\r\n\r\n")
            line, *headers = head.decode().split("\r\n")
            _, path, _ = line.split(" ")
            conn.request("POST", path, body=body, headers=dict(h.split(": ", 1) for h in headers))
            response = conn.getresponse()
            data = response.read()
            assert response.status == 200, data
            return json.loads(data) if self.kind == "classify" else data
        finally:
            conn.close()

    def doomed(self):
        """Sends a whole request on a raw socket; returns the function that disconnects."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(http_request(self.kind))
        self.sockets.append(sock)
        if self.leave == "shutdown":  # half-close: "I have sent everything" (uvicorn closes the connection)
            return lambda: sock.shutdown(socket.SHUT_WR)
        return sock.close


    def close(self):
        for sock in self.sockets:
            sock.close()


class GrpcTransport:
    def __init__(self, server, kind):
        import grpc

        from serve._proto import grpc_service_pb2 as pb
        from serve._proto import grpc_service_pb2_grpc, kestrel_pb2, kestrel_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        if kind == "classify":
            self.call = kestrel_pb2_grpc.ClassifierStub(self.channel).Classify
            self.request = kestrel_pb2.ClassifyRequest(image=IMAGE, models=["gate"])
        else:
            self.call = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel).ModelInfer
            self.request = pb.ModelInferRequest(
                model_name="gate", inputs=[pb.ModelInferRequest.InferInputTensor(
                    name="images", datatype="UINT8", shape=[1, 32, 32, 3])], raw_input_contents=[bytes(3072)])

    def good(self):
        return self.call(self.request, timeout=10)

    def doomed(self):
        future = self.call.future(self.request, timeout=10)
        return future.cancel

    def close(self):
        self.channel.close()


@pytest.fixture(params=["http-classify", "http-infer", "http-classify-shutdown", "grpc-classify", "grpc-infer"])
def transport(request, server):
    name, kind, *leave = request.param.split("-")
    made = HttpTransport(server, kind, *leave) if name == "http" else GrpcTransport(server, kind)
    yield made
    if hasattr(made, "close"):
        made.close()


# ---- the cases --------------------------------------------------------------------------------
def test_a_queued_request_whose_client_left_never_reaches_the_model(server, gate, transport, quiet):
    batcher = server.hub.models["gate"].batcher
    cancelled_before = failures(server)
    blocker = threading.Thread(target=transport.good, daemon=True)  # holds the only worker at the gate
    blocker.start()
    wait_for(lambda: gate.calls == [1], "the first request to reach the model")
    leave = transport.doomed()
    wait_for(lambda: batcher.queued == 1, "the second request to wait in the batcher's queue")
    queued = batcher._queue[0]
    leave()
    wait_for(lambda: queued.cancelled, "the server to notice that the client went away")
    gate.open.set()
    blocker.join(10)
    assert not blocker.is_alive()
    wait_for(lambda: failures(server) == cancelled_before + 1, "the dropped request to be recorded as cancelled")
    wait_for(lambda: batcher._outstanding == 0, "the batcher to be idle")
    assert gate.calls == [1]  # the blocker ran; the request whose client left did not
    assert not loud(quiet), loud(quiet)
    transport.good()  # the server still answers
    assert gate.calls == [1, 1]


@pytest.mark.parametrize("kind", ["classify", "infer"])
def test_a_result_whose_http_client_left_is_discarded_quietly(server, gate, kind, quiet):
    state = server.http.server._server.server_state
    http = HttpTransport(server, kind)
    cancelled_before = failures(server)
    succeeded_before = server.hub.metrics.model("gate", "1").snapshot()["inference_count"]
    leave = http.doomed()
    wait_for(lambda: gate.calls == [1], "the request to reach the model")
    leave()
    wait_for(lambda: not state.connections, "the server to see the connection close")
    gate.open.set()
    wait_for(lambda: failures(server) == cancelled_before + 1, "the request to be recorded as cancelled")
    assert not loud(quiet), loud(quiet)
    http.good()
    assert gate.calls == [1, 1]
    assert server.hub.metrics.model("gate", "1").snapshot()["inference_count"] >= succeeded_before + 1


class _Scope:
    """What run_watched needs of a data plane request scope: the list its queued work joins."""

    def __init__(self):
        from serve._cancel import CancelOnEnd

        self.submitted = CancelOnEnd()


def test_an_http_request_whose_client_left_before_the_work_started_is_not_run():
    """The ASGI receive channel already says http.disconnect when the body has been read:
    the data plane is never called."""
    from starlette.requests import ClientDisconnect, Request

    from serve.http._app import HttpOptions, _Kestrel

    calls = []

    async def receive():
        return {"type": "http.disconnect"}

    async def main():
        k = _Kestrel(plane=None, options=HttpOptions(threads=1))
        try:
            request = Request({"type": "http", "method": "POST", "path": "/v1/classify", "headers": [],
                               "query_string": b""}, receive)
            with pytest.raises(ClientDisconnect):
                await k.run_watched(request, _Scope(), lambda: calls.append("ran"))
        finally:
            k.close()

    asyncio.run(main())
    assert calls == []


def test_an_http_request_still_connected_runs_and_is_answered():
    from starlette.requests import Request

    from serve.http._app import HttpOptions, _Kestrel

    async def receive():  # a connection that stays open: receive() waits for ever
        await asyncio.Event().wait()

    async def main():
        k = _Kestrel(plane=None, options=HttpOptions(threads=1))
        try:
            request = Request({"type": "http", "method": "POST", "path": "/v1/classify", "headers": [],
                               "query_string": b""}, receive)
            scope = _Scope()
            return await k.run_watched(request, scope, lambda x: (x, scope.submitted.ended), 42)
        finally:
            k.close()

    assert asyncio.run(main()) == (42, False)


def test_work_added_after_the_end_is_cancelled_as_it_comes():
    from serve._cancel import CancelOnEnd
    from serve.batching import Pending

    def pending():
        return Pending(np.zeros((1, 2, 2, 3), np.uint8), None)

    submitted = CancelOnEnd()
    early = pending()
    submitted.append(early)
    assert not early.cancelled
    submitted.end()
    late = [pending(), pending()]
    submitted.extend(late)
    assert early.cancelled and all(p.cancelled for p in late)
