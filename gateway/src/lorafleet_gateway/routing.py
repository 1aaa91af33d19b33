"""Which server answers a chat: one that serves the adapter's latest committed version.

The adapter's trainer knows its latest version and, per server, the version each serves (it
publishes them itself, ``served[]`` of its state). A chat goes to a server that serves the latest,
in rotation; when none does yet (a step just committed) the gateway asks again until
``latest_wait_seconds`` have passed, then answers with the newest version a server does serve and
says so (``X-LoraFleet-Latest: false``); with no server at all it answers 503 with Retry-After.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from lorafleet_api import wire

_turns = itertools.count()


@dataclass(frozen=True)
class Choice:
    server: str
    url: str
    version: int  # the version that server serves
    latest: int  # the adapter's latest committed version

    @property
    def is_latest(self) -> bool:
        return self.version == self.latest


def choose(state: wire.AdapterState, servers: Mapping[str, str], *, latest_only: bool) -> Choice | None:
    """A server for ``state``'s adapter among ``servers`` (name -> URL): one serving the latest
    version; unless ``latest_only``, else one serving the newest version any serves."""
    served = [s for s in state.served if s.server in servers and s.version is not None and not s.error]
    latest = [s for s in served if s.version == state.version]
    pool = (
        latest
        if latest or latest_only
        else [s for s in served if s.version == max(x.version or 0 for x in served)]
    )
    if not pool:
        return None
    pick = pool[next(_turns) % len(pool)]
    return Choice(pick.server, servers[pick.server], pick.version or 0, state.version)
