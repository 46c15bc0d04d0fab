"""The front door's gRPC registrations, light enough for Serve's gRPC proxy to import.

Serve's proxies import the `grpc_servicer_functions` the app names (cluster/serve/builder.py
GRPC_SERVICERS); this one imports grpc and the generated messages only (not torch, not the
engine), so a proxy stays small. Its request parser hands a request that does not parse
(bad UTF-8 in a string, a truncated message) to the method as `Undecodable`, which the
method answers with INVALID_ARGUMENT: a parser that raised would make gRPC answer UNKNOWN.

`add_health_servicer` registers the standard `grpc.health.v1.Health` the same way: in
Serve's proxy its calls go to the ingress's Check, List and Watch (cluster/api/grpc_health.py),
like Generate's. Serve 2.60's proxy offers server reflection itself (`grpc_options.
enable_reflection`, on by default), listing what these functions registered.
"""

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1.health_pb2_grpc import add_HealthServicer_to_server

from protos import generation_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class Undecodable:
    """In place of a request that does not parse."""

    def __init__(self, error: str):
        self.error = error


def _parse(data: bytes) -> pb.GenerateRequest | Undecodable:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        return Undecodable(str(e))


def add_generation_servicer(servicer, server) -> None:
    """Register Generation/Generate on a gRPC server (a plain one, or Serve's proxy) with the
    tolerant parser, so both parse alike."""
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=_parse, response_serializer=pb.GenerateResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def add_health_servicer(servicer, server) -> None:
    """Register grpc.health.v1.Health (Check, List, Watch) on a gRPC server (a plain one, or Serve's proxy)."""
    add_HealthServicer_to_server(servicer, server)
