"""Where the tiers listen unless told otherwise; servers and clients share these."""

from __future__ import annotations

#: The default port of each tier.
DEFAULT_PORTS = {"coordinate": 50051, "orchestrate": 50052, "execute": 50053}
#: The default port of each tier's Prometheus endpoint (``/metrics``).
DEFAULT_METRICS_PORTS = {"coordinate": 9451, "orchestrate": 9452, "execute": 9453}
#: The tiers, from the top.
TIERS = tuple(DEFAULT_PORTS)


def default_target(tier: str) -> str:
    """Returns the loopback address a tier listens on by default."""
    return f"127.0.0.1:{DEFAULT_PORTS[tier]}"
