"""Who may call the front door: API keys, for HTTP (`Authorization: Bearer KEY`) and gRPC
(the same `authorization` metadata), from the config's `api_keys` and `MOE_SERVE_API_KEY`.

An app that listens beyond loopback must have at least one key (`require_keys`): anyone
who can reach the port could otherwise use the GPUs. Keys are compared in constant time
and never printed: `ApiKeys` shows how many it holds, not what they are.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Iterable, Mapping

from mixtral.config import ConfigError

ENV = "MOE_SERVE_API_KEY"


class ApiKeys:
    """The keys that open the front door; none means it is open to whoever can reach it."""

    def __init__(self, keys: Iterable[str] = ()):
        self._keys = tuple(k.encode() for k in dict.fromkeys(k.strip() for k in keys) if k)

    @classmethod
    def resolve(cls, configured: Iterable[str], env: Mapping[str, str] = os.environ) -> ApiKeys:
        """The config's keys plus those in MOE_SERVE_API_KEY (comma-separated, e.g. from a Secret)."""
        return cls([*configured, *env.get(ENV, "").split(",")])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, key: str | None) -> bool:
        if not self._keys:
            return True
        if not key:
            return False
        given = key.encode()
        # Every key is compared, so the time taken says nothing about which one nearly matched.
        return any([hmac.compare_digest(given, k) for k in self._keys])

    def allows_header(self, authorization: str | None) -> bool:
        """An `Authorization` header (HTTP) or `authorization` metadata value (gRPC): "Bearer KEY"."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        return self.allows(key.strip() if scheme.lower() == "bearer" else None)

    def allows_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        value = next((v for k, v in metadata or () if k.lower() == "authorization"), None)
        return self.allows_header(value.decode(errors="replace") if isinstance(value, bytes) else value)

    def __reduce__(self):       # crosses Ray handles as the keys themselves, never as their text in a repr
        return (ApiKeys, ([k.decode() for k in self._keys],))

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False    # a hostname: it may resolve to anything


def require_keys(host: str, keys: ApiKeys) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if not keys.enabled and not is_loopback(host):
        raise ConfigError(f"http_host {host} listens beyond this machine: set an API key ({ENV}=... in the "
                          f"environment, or api_keys: [...] in the config) so that not everyone who can "
                          f"reach the port can use the model")
