"""The one error a request can be refused with, wherever it is found to be bad.

It names the parameter at fault and, where OpenAI has one, the error code, so each front
door maps it once (HTTP 400 with OpenAI's body, gRPC INVALID_ARGUMENT) without reading
its message. It pickles with its fields, so it keeps its type across a Ray handle.
"""


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code)
        self.message, self.param, self.code = message, param, code

    def __str__(self) -> str:
        return self.message
