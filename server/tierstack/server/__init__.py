"""tierstack's three async gRPC servers and the engines behind them."""

from tierstack.server.app import BindError, TierServer, TierService, serve_until_signalled, service_for
from tierstack.server.config import DEFAULT_PORTS, TIERS, Settings
from tierstack.server.tls import ServerTls

__all__ = [
    "DEFAULT_PORTS",
    "TIERS",
    "BindError",
    "ServerTls",
    "Settings",
    "TierServer",
    "TierService",
    "serve_until_signalled",
    "service_for",
]
