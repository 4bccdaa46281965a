"""TLS of a tier: the certificate it serves with, mutual TLS for its callers, and the TLS of its calls
to the tiers below."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from tierstack.client.tls import Tls


@dataclass(frozen=True, kw_only=True)
class ServerTls:
    """A tier's TLS: PEM bytes, read once at start-up.

    Attributes:
        certificate: The certificate chain the server presents; on calls to the tiers below it is the
            client certificate too, for mutual TLS there.
        key: Its private key (never shown in a repr).
        ca: The certificates of the authorities trusted to sign the certificates of the tiers below
            and, with ``client_auth``, of every caller; None trusts the system's for the tiers below.
        client_auth: Mutual TLS: every caller must present a certificate signed by ``ca``.
        server_name: The name checked in the certificates of the tiers below instead of their host.
    """

    certificate: bytes
    key: bytes = field(repr=False)
    ca: bytes | None = None
    client_auth: bool = False
    server_name: str = ""

    def __post_init__(self) -> None:
        if self.client_auth and self.ca is None:
            raise ValueError("mutual TLS (TIERSTACK_TLS_CLIENT_AUTH) needs the CA of the callers (TIERSTACK_TLS_CA)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerTls | None:
        """Reads the files named by ``TIERSTACK_TLS_CERT``, ``TIERSTACK_TLS_KEY`` and ``TIERSTACK_TLS_CA``,
        with ``TIERSTACK_TLS_CLIENT_AUTH=1`` for mutual TLS; None (plaintext) when no certificate is
        set. Blocking: call it before the event loop runs."""
        env = os.environ if env is None else env
        files = Tls.from_env(env)
        if files is None or files.certificate is None or files.key is None:
            if files is not None:
                raise ValueError("a server's TLS needs TIERSTACK_TLS_CERT and TIERSTACK_TLS_KEY")
            return None
        return cls(
            certificate=files.certificate,
            key=files.key,
            ca=files.ca,
            client_auth=env.get("TIERSTACK_TLS_CLIENT_AUTH", "").lower() in ("1", "true", "yes"),
            server_name=files.server_name,
        )

    def credentials(self) -> grpc.ServerCredentials:
        """Returns the credentials the server listens with."""
        return grpc.ssl_server_credentials(
            [(self.key, self.certificate)], root_certificates=self.ca, require_client_auth=self.client_auth
        )

    def below(self) -> Tls:
        """Returns the TLS of calls to the tiers below: their certificates checked against ``ca``, and
        this server's certificate presented to them."""
        return Tls(ca=self.ca, certificate=self.certificate, key=self.key, server_name=self.server_name)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind) is reachable from this machine alone."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any address
