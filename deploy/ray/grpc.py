"""The servicer functions Ray Serve's gRPC proxy registers (grpc_options.grpc_servicer_functions).

Ray pickles each request message from the proxy to the ingress replica. protoc names the messages'
module after the .proto file (`grpc_service_pb2`), while Kestrel imports the generated code as
`serve._proto.grpc_service_pb2`; pickle looks classes up by module name, so both processes get the
bare names as aliases of Kestrel's modules (importing this module does it) before any message moves.
"""

from __future__ import annotations

import sys

from serve._proto import grpc_service_pb2, grpc_service_pb2_grpc, kestrel_pb2, kestrel_pb2_grpc, model_config_pb2


def alias_generated_modules() -> None:
    """sys.modules["grpc_service_pb2"] etc. -> serve._proto's modules (idempotent)."""
    for module in (grpc_service_pb2, kestrel_pb2, model_config_pb2):
        bare = module.__name__.rsplit(".", 1)[-1]
        existing = sys.modules.get(bare)
        if existing is not None and existing is not module:
            raise ImportError(f"a different module {bare!r} is already imported ({existing!r}); Kestrel's Ray "
                              "application cannot run in a process that imports another copy (e.g. tritonclient's)")
        sys.modules[bare] = module


alias_generated_modules()

add_GRPCInferenceServiceServicer_to_server = grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server
add_ClassifierServicer_to_server = kestrel_pb2_grpc.add_ClassifierServicer_to_server

SERVICER_FUNCTIONS = [
    f"{__name__}.add_GRPCInferenceServiceServicer_to_server",
    f"{__name__}.add_ClassifierServicer_to_server",
]
