"""Where the tiers listen, and how large their messages may be, unless told otherwise; servers and
clients share these."""

from __future__ import annotations

#: The default port of each tier.
DEFAULT_PORTS = {"coordinate": 50051, "orchestrate": 50052, "execute": 50053}
#: The default port of each tier's Prometheus endpoint (``/metrics``).
DEFAULT_METRICS_PORTS = {"coordinate": 9451, "orchestrate": 9452, "execute": 9453}
#: The tiers, from the top.
TIERS = tuple(DEFAULT_PORTS)
#: The largest message, in bytes, a server or a client sends or receives unless told otherwise: the
#: same on every server and every hop, so whatever one tier accepts the next can carry. 16 MiB holds
#: a step output at its default cap (1 MiB) many times over, and a run's outputs (up to half of
#: this), while a message held whole in memory on each side stays small.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


def default_target(tier: str) -> str:
    """Returns the loopback address a tier listens on by default."""
    return f"127.0.0.1:{DEFAULT_PORTS[tier]}"


#: The most calls one ExecuteStream holds in flight (Execute refuses more, RESOURCE_EXHAUSTED).
MAX_STREAM_CALLS = 16_384
