"""How a channel checks the server it talks to (TLS) and, for mutual TLS, proves who it is."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc


@dataclass(frozen=True, kw_only=True)
class Tls:
    """TLS for a channel: PEM bytes, read once.

    Attributes:
        ca: The certificates of the authorities that sign the servers' certificates; None trusts the
            system's.
        certificate: The certificate chain this side presents, for servers that ask for one (mutual TLS).
        key: The private key of ``certificate`` (never shown in a repr).
        server_name: The name checked in the server's certificate instead of the target's host, for
            servers reached by an address their certificate does not name.
    """

    ca: bytes | None = None
    certificate: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    @classmethod
    def from_files(
        cls,
        *,
        ca: str | Path | None = None,
        certificate: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str = "",
    ) -> Tls:
        """Reads PEM files (blocking: call it before the event loop runs, or in a thread)."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None or path == "" else Path(path).read_bytes()

        return cls(ca=read(ca), certificate=read(certificate), key=read(key), server_name=server_name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tls | None:
        """Reads the files that ``TIERSTACK_TLS_CA``, ``TIERSTACK_TLS_CERT`` and ``TIERSTACK_TLS_KEY``
        name (and ``TIERSTACK_TLS_SERVER_NAME``); None (plaintext) when none is set. Blocking, as
        :meth:`from_files`."""
        env = os.environ if env is None else env
        paths = {name: env.get(f"TIERSTACK_TLS_{name.upper()}", "") for name in ("ca", "cert", "key")}
        if not any(paths.values()):
            return None
        return cls.from_files(
            ca=paths["ca"],
            certificate=paths["cert"],
            key=paths["key"],
            server_name=env.get("TIERSTACK_TLS_SERVER_NAME", ""),
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """Returns the channel credentials gRPC dials with."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.certificate
        )
