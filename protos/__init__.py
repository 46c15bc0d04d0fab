"""The wire contract: .proto files, their generated stubs and the tensor codec."""
