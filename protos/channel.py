"""What both ends of an ExpertShard connection agree on: method paths and channel options."""

from protos import expert_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ExpertShard"].full_name  # moe_serve.expert.v1.ExpertShard
FORWARD = f"/{SERVICE}/Forward"
FORWARD_STREAM = f"/{SERVICE}/ForwardStream"
INFO = f"/{SERVICE}/Info"
# The revision of the v1 contract this code speaks (expert.proto says what each adds).
REVISION = 2
# A 2048-token batch of 8x22B activations is ~25 MB; gRPC's default cap is 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 512 << 20


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options for either end; a client needs them too, its receive default is 4 MiB."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
