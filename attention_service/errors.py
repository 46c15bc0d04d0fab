"""The errors a request can end with, wherever they are found, typed so each front door maps them once.

`RequestError` is the client's fault: it names the parameter at fault and, where OpenAI
has one, the error code (HTTP 400 with OpenAI's body, gRPC INVALID_ARGUMENT), without
the front door reading its message. `Unavailable` is nobody's fault in the request: the
server cannot serve it now (an expert group with no live replica, no attention replica)
and says when to try again (HTTP 503 + Retry-After, gRPC UNAVAILABLE); `Overloaded` is
the same for a full queue (HTTP 429, gRPC RESOURCE_EXHAUSTED). All pickle with their
fields, so they keep their types across a Ray handle.
"""


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code)
        self.message, self.param, self.code = message, param, code

    def __str__(self) -> str:
        return self.message


class Unavailable(RuntimeError):
    """The request cannot be served now; the same request may succeed after retry_after_s."""

    def __init__(self, message: str, retry_after_s: float = 5.0):
        super().__init__(message, retry_after_s)
        self.message, self.retry_after_s = message, retry_after_s

    def __str__(self) -> str:
        return self.message


class ExpertGroupUnavailable(RuntimeError):
    """No live replica of an expert group: the step cannot be computed (the engine waits for one)."""


class Overloaded(Unavailable):
    """Refused because the queue is full, before any work was done."""
