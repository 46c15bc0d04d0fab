"""The front doors: OpenAI HTTP, chat template and tool calls, public gRPC, request telemetry."""
