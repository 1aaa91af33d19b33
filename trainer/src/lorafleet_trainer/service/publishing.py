"""Publishing: each committed adapter version reaches the pool's inference servers.

The operator tells a trainer pod which servers its pool has and which adapters this pod owns
(``PUT /v1/serving``); init names an adapter's served name too. From then on a :class:`Publisher`
keeps every server serving the newest committed version of every owned adapter, beside the step
path: a step only records its new version and wakes the server workers, it never waits for them.

The publisher owns the served path: it keeps each version's artifact relative to the store and
the adapter root the servers mount the store at (``PUT /v1/serving``'s ``adapter_root``, else the
trainer's own store root), and joins the two only when a worker compares or loads.

One :class:`ServerWorker` thread per server reconciles by looking, not by remembering: each pass
reads the server's loaded adapters (``GET /v1/models``, where vLLM lists each adapter with the path
it was loaded from) and loads whatever is missing or at another path (``/v1/load_lora_adapter``,
in place when the name is already loaded). A restarted server lists nothing, so it gets every
adapter again at its next pass; a new adapter root makes every path another one, so each adapter
is loaded again from there; versions that commit while a load runs coalesce into the next pass,
which loads only the newest. Failures are retried with exponential backoff, per server when
it cannot be reached and per adapter when it refuses one; each is counted by reason and kept as
the adapter's last error on that server, which the adapter's state reports to the operator.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lorafleet_trainer.ids import AdapterId

log = logging.getLogger(__name__)

# Failure reasons (``publish_failures_total{reason}``): the server could not be reached or timed
# out; it answered the load with a 4xx (e.g. a rank above its --max-lora-rank, or 401: a wrong API
# key) or a 5xx; the API key the servers require is missing here (``server_keys``).
REASONS = ("unreachable", "timeout", "refused", "server_error", "api_key")
RESYNC_SECONDS = 5.0  # a pass per server at least this often: restarted servers are found by looking
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 15.0
REQUEST_TIMEOUT_SECONDS = 60.0  # a load on a busy CPU server takes seconds, not minutes
UNLOAD_WAIT_SECONDS = 10.0


class PublishError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Server:
    """One inference server: its pod name (the key in statuses) and its base URL."""

    name: str
    url: str


@dataclass(frozen=True)
class Wanted:
    """What every server should serve for one adapter: its newest committed version."""

    served_name: str
    version: int
    artifact: str  # the version's directory relative to the store (storage.artifact)
    committed_at: float  # time.monotonic() of the commit (publish latency counts from it)


@dataclass
class Served:
    """What one server serves of one adapter, as this pod last saw it."""

    version: int | None = None  # None: nothing served
    error: str = ""
    reason: str = ""
    since: str = field(default_factory=_now)  # when version or error last changed
    failures: int = 0  # consecutive, for the backoff
    retry_at: float = 0.0

    def to_json(self, server: str) -> dict[str, Any]:
        since = self.since or None
        return {"server": server, "version": self.version, "error": self.error or None, "since": since}


class ServerClient:
    """vLLM's runtime LoRA API (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``) over plain HTTP.

    ``api_key``: called before every request for the key the server requires (``--api-key``),
    sent as a bearer token; it raises PublishError when there is none to send."""

    def __init__(
        self,
        url: str,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        api_key: Callable[[], str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key

    def _call(self, method: str, route: str, body: Mapping[str, Any] | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + route, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key is not None:
            request.add_header("Authorization", f"Bearer {self.api_key()}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload: bytes = response.read()
                return payload
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")[:500]
            reason = "refused" if 400 <= exc.code < 500 else "server_error"
            message = f"{method} {route} answered {exc.code}: {_message(text)}"
            if exc.code == 401:
                message += (
                    " (the server refused the API key of spec.serving.apiKeySecretRef)"
                    if self.api_key is not None
                    else " (the server requires an API key: name its Secret in spec.serving.apiKeySecretRef)"
                )
            raise PublishError(reason, message) from None
        except TimeoutError:
            raise PublishError("timeout", f"{method} {route}: no answer in {self.timeout:.0f} s") from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            raise PublishError("unreachable", f"{method} {self.url}{route}: {why}") from None

    def loaded(self) -> dict[str, str]:
        """Adapter name -> the path it was loaded from (vLLM lists an adapter with ``parent`` set)."""
        listing = json.loads(self._call("GET", "/v1/models"))
        return {
            str(card["id"]): str(card.get("root") or "")
            for card in listing.get("data") or []
            if card.get("parent")
        }

    def load(self, name: str, path: str, *, inplace: bool) -> None:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        self._call("POST", "/v1/load_lora_adapter", body)

    def unload(self, name: str) -> None:
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})


def _message(text: str) -> str:
    """vLLM's error body (``{"error": {"message": ...}}`` or ``{"message": ...}``), else the text."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


@dataclass
class PublishObserver:
    """Where the publisher reports to (the trainer's metrics); no-ops by default."""

    published: Callable[[float], None] = lambda seconds: None
    failed: Callable[[str], None] = lambda reason: None


def served_path(root: str, artifact: str) -> str:
    """Where a server that mounts the store at ``root`` finds ``artifact``."""
    return f"{root.rstrip('/')}/{artifact}"


class Publisher:
    """The adapters this pod owns, where the servers find them, the servers of its pool, and one
    worker per server."""

    def __init__(
        self,
        observer: PublishObserver | None = None,
        *,
        store_root: str,
        client: Callable[[str], ServerClient] = ServerClient,
        resync_seconds: float = RESYNC_SECONDS,
        hold: Callable[[], None] | None = None,
    ) -> None:
        self.observer = observer or PublishObserver()
        # Called (on a worker thread) when what a server serves of an adapter, or its error, changes.
        self.on_change: Callable[[AdapterId], None] = lambda adapter: None
        self.hold_before_load = hold or (lambda: None)  # fault tests park a load here (holds.PUBLISH)
        self._client = client
        self.resync_seconds = resync_seconds
        self._lock = threading.Lock()
        self._store_root = store_root  # the servers' root unless the operator names another
        self._adapter_root = store_root
        self._wanted: dict[AdapterId, Wanted] = {}
        self._names: dict[AdapterId, str] = {}  # served names of owned adapters, even before a version
        self._workers: dict[Server, ServerWorker] = {}
        self._loading: dict[AdapterId, dict[int, int]] = {}
        self._closed = False

    # ---- what the rest of the trainer tells it ------------------------------------------------

    def own(self, adapter: AdapterId, served_name: str, version: int, artifact: str) -> None:
        """This pod owns ``adapter`` (init, or the operator's list): serve ``version``, whose
        directory in the store is ``artifact``."""
        with self._lock:
            self._names[adapter] = served_name
            current = self._wanted.get(adapter)
            if (
                current is not None
                and current.served_name == served_name
                and (
                    current.version > version or (current.version == version and current.artifact == artifact)
                )
            ):
                return  # wanted already, or a newer commit is
            self._wanted[adapter] = Wanted(served_name, version, artifact, time.monotonic())
        self._wake()

    def committed(self, adapter: AdapterId, version: int, artifact: str) -> None:
        """A step committed ``version`` of an owned adapter; returns at once (workers load it)."""
        with self._lock:
            name = self._names.get(adapter)
            if name is None:
                return  # not owned here: no serving configured for it
            self._wanted[adapter] = Wanted(name, version, artifact, time.monotonic())
        self._wake()

    def set_adapter_root(self, root: str | None) -> None:
        """Where the servers mount the store from now on (None: where this trainer keeps it).
        A new root reaches every server at its next pass: each owned adapter is loaded again."""
        with self._lock:
            root = self._store_root if root is None else root
            changed, self._adapter_root = root != self._adapter_root, root
        if changed:
            self._wake()

    def disown(
        self, adapter: AdapterId, wait: float = UNLOAD_WAIT_SECONDS, served_name: str | None = None
    ) -> dict[str, str]:
        """Stop serving ``adapter``: unload it from every server. Waits up to ``wait`` s and
        answers server -> "unloaded" | "absent" | the error; failed unloads keep being retried.

        ``served_name``: the name to unload when this pod does not publish the adapter (the pod
        that did is gone); a server that loaded that name from another adapter's files keeps it.
        """
        only_from = None
        with self._lock:
            name = self._names.pop(adapter, None)
            self._wanted.pop(adapter, None)
            workers = list(self._workers.values())
            if name is None and served_name is not None:
                name = served_name
                only_from = served_path(self._adapter_root, f"{adapter.namespace}/.{adapter.name}.v")
        if name is None:
            return {}
        tickets = [(w, w.unload(adapter, name, only_from)) for w in workers]
        deadline = time.monotonic() + wait
        result = {}
        for worker, ticket in tickets:
            ticket.done.wait(max(0.0, deadline - time.monotonic()))
            result[worker.server.name] = ticket.outcome or "pending: no answer yet"
        return result

    def set_servers(self, servers: Sequence[Server]) -> None:
        """The pool's servers now; a worker starts for each new one and stops for each gone one."""
        wanted = set(servers)
        with self._lock:
            if self._closed:
                return
            gone = [w for s, w in self._workers.items() if s not in wanted]
            for server in wanted - set(self._workers):
                self._workers[server] = ServerWorker(self, server, self._client(server.url)).start()
            for worker in gone:
                del self._workers[worker.server]
        for worker in gone:
            worker.stop(wait=False)  # a server that hangs must not hold up the operator's call

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.stop()

    # ---- what it reports ---------------------------------------------------------------------

    @property
    def adapter_root(self) -> str:
        with self._lock:
            return self._adapter_root

    @property
    def servers(self) -> list[Server]:
        with self._lock:
            return sorted(self._workers, key=lambda s: s.name)

    def served_name(self, adapter: AdapterId) -> str | None:
        with self._lock:
            return self._names.get(adapter)

    def state(self, adapter: AdapterId) -> list[dict[str, Any]]:
        """Per server: the version it serves of ``adapter`` and its last error."""
        with self._lock:
            workers = sorted(self._workers.values(), key=lambda w: w.server.name)
            owned = adapter in self._names
        if not owned:
            return []
        return [w.served(adapter).to_json(w.server.name) for w in workers]

    def lag(self) -> tuple[int, float]:
        """(most versions any server is behind on any adapter, seconds the oldest unserved
        commit has waited); (0, 0.0) when everything is served. A server loading a version again
        from a new adapter root is not behind: it answers with that version meanwhile."""
        with self._lock:
            wanted = dict(self._wanted)
            workers = list(self._workers.values())
        versions, seconds = 0, 0.0
        now = time.monotonic()
        for worker in workers:
            for adapter, want in wanted.items():
                served = worker.served(adapter).version
                if served is None or served < want.version:
                    versions = max(versions, want.version - (served if served is not None else -1))
                    seconds = max(seconds, now - want.committed_at)
        return versions, seconds

    def loading_versions(self, adapter: AdapterId) -> set[int]:
        """Versions a worker is loading right now: storage keeps their artifacts until it ends."""
        with self._lock:
            return set(self._loading.get(adapter, {}))

    # ---- for the workers ---------------------------------------------------------------------

    def wanted(self) -> dict[AdapterId, Wanted]:
        with self._lock:
            return dict(self._wanted)

    def current(self, adapter: AdapterId) -> Wanted | None:
        with self._lock:
            return self._wanted.get(adapter)

    def path(self, want: Wanted) -> str:
        """``want``'s artifact under the current adapter root: what a server should have loaded."""
        with self._lock:
            return served_path(self._adapter_root, want.artifact)

    @contextlib.contextmanager
    def loading(self, adapter: AdapterId, version: int) -> Iterator[None]:
        with self._lock:
            counts = self._loading.setdefault(adapter, {})
            counts[version] = counts.get(version, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                counts[version] -= 1
                if not counts[version]:
                    del counts[version]
                if not counts:
                    self._loading.pop(adapter, None)

    def _wake(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.wake()


@dataclass
class Unload:
    adapter: AdapterId
    name: str
    done: threading.Event = field(default_factory=threading.Event)
    outcome: str = ""
    # For an adapter this pod never published (its own pod is gone): unload the name only where it
    # was loaded from one of that adapter's version directories (paths starting with this).
    only_from: str | None = None


class ServerWorker:
    """Keeps one server serving the publisher's wanted versions; see the module docstring."""

    def __init__(self, publisher: Publisher, server: Server, client: ServerClient) -> None:
        self.publisher = publisher
        self.server = server
        self.client = client
        self._lock = threading.Lock()
        self._served: dict[AdapterId, Served] = {}
        self._unloads: list[Unload] = []
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._down_failures = 0
        self._down_until = 0.0
        self._thread = threading.Thread(target=self._run, name=f"publish-{server.name}", daemon=True)

    def start(self) -> ServerWorker:
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """End the worker; without ``wait`` a load in flight finishes on its own (at most one)."""
        self._stopping.set()
        self._wakeup.set()
        if wait:
            self._thread.join(timeout=REQUEST_TIMEOUT_SECONDS)

    def wake(self) -> None:
        self._wakeup.set()

    def served(self, adapter: AdapterId) -> Served:
        with self._lock:
            return replace(self._served.get(adapter) or Served(since=""))

    def unload(self, adapter: AdapterId, name: str, only_from: str | None = None) -> Unload:
        ticket = Unload(adapter, name, only_from=only_from)
        with self._lock:
            self._unloads.append(ticket)
            self._served.pop(adapter, None)
        self.wake()
        return ticket

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._pass()
            except Exception:  # a bug here must not end publishing for the pod's life
                log.exception("publishing to %s failed unexpectedly", self.server.name)
            delay = self.publisher.resync_seconds
            if self._down_until:
                delay = min(delay, max(0.0, self._down_until - time.monotonic()))
            self._wakeup.wait(delay)
            self._wakeup.clear()

    def _pass(self) -> None:
        now = time.monotonic()
        if now < self._down_until:
            return
        try:
            loaded = self.client.loaded()
        except PublishError as exc:
            self._server_down(exc)
            return
        if self._down_failures:
            log.info("inference server %s reachable again", self.server.name)
        self._down_failures, self._down_until = 0, 0.0
        self._do_unloads(loaded)
        for adapter, want in self.publisher.wanted().items():
            if self._stopping.is_set():
                return
            self._publish(adapter, want, loaded)

    def _publish(self, adapter: AdapterId, want: Wanted, loaded: Mapping[str, str]) -> None:
        have = loaded.get(want.served_name)
        if have == self.publisher.path(want):
            self._record_served(adapter, want)
            return
        with self._lock:
            state = self._served.setdefault(adapter, Served())
            lost = have is None and state.version is not None
            if lost:
                state.version, state.since = None, _now()  # the server lost it (a restart)
            backing_off = time.monotonic() < state.retry_at
        if lost:
            self.publisher.on_change(adapter)
        if backing_off:
            return
        # The newest version may have committed since the listing: load that one.
        want = self.publisher.current(adapter) or want
        with self.publisher.loading(adapter, want.version):
            self.publisher.hold_before_load()
            # Joined at load time: a root that changed since the listing is the one loaded.
            path = self.publisher.path(want)
            try:
                self.client.load(want.served_name, path, inplace=have is not None)
            except PublishError as exc:
                if self.publisher.current(adapter) is None:
                    return  # disowned meanwhile
                self._adapter_failed(adapter, want, exc)
                return
        if self.publisher.current(adapter) is None:
            # Disowned while it loaded: take it off again.
            with contextlib.suppress(PublishError):
                self.client.unload(want.served_name)
            return
        self._record_served(adapter, want)

    def _record_served(self, adapter: AdapterId, want: Wanted) -> None:
        with self._lock:
            state = self._served.setdefault(adapter, Served())
            first_time = state.version != want.version
            recovered = bool(state.error)
            if first_time or recovered:
                state.since = _now()
            state.version, state.error, state.reason, state.failures, state.retry_at = (
                want.version, "", "", 0, 0.0,
            )  # fmt: skip
        if first_time or recovered:
            self.publisher.on_change(adapter)
        if first_time:
            self.publisher.observer.published(time.monotonic() - want.committed_at)
        if recovered:
            log.info("%s serves %s version %d again", self.server.name, want.served_name, want.version)

    def _adapter_failed(self, adapter: AdapterId, want: Wanted, exc: PublishError) -> None:
        self.publisher.observer.failed(exc.reason)
        with self._lock:
            state = self._served.setdefault(adapter, Served())
            changed = state.error != str(exc)
            if changed:
                state.since = _now()
                log.warning(
                    "publishing %s v%d to %s: %s", want.served_name, want.version, self.server.name, exc
                )
            state.error, state.reason = str(exc), exc.reason
            state.retry_at = time.monotonic() + _backoff(state.failures)
            state.failures += 1
        if changed:
            self.publisher.on_change(adapter)

    def _server_down(self, exc: PublishError) -> None:
        self.publisher.observer.failed(exc.reason)
        if not self._down_failures:
            log.warning("inference server %s: %s", self.server.name, exc)
        self._down_until = time.monotonic() + _backoff(self._down_failures)
        self._down_failures += 1
        with self._lock:
            for adapter in self.publisher.wanted():
                state = self._served.setdefault(adapter, Served())
                if state.error != str(exc):
                    state.since = _now()
                state.error, state.reason = str(exc), exc.reason
            for ticket in self._unloads:  # they stay queued; a waiting disown hears why now
                ticket.outcome = str(exc)
                ticket.done.set()

    def _do_unloads(self, loaded: Mapping[str, str]) -> None:
        with self._lock:
            tickets = list(self._unloads)
        for ticket in tickets:
            path = loaded.get(ticket.name)
            if path is None or (ticket.only_from is not None and not path.startswith(ticket.only_from)):
                ticket.outcome = "absent"
            else:
                try:
                    self.client.unload(ticket.name)
                    ticket.outcome = "unloaded"
                except PublishError as exc:
                    self.publisher.observer.failed(exc.reason)
                    ticket.outcome = str(exc)
                    ticket.done.set()
                    continue  # stays queued: the next pass retries it
            ticket.done.set()
            with self._lock:
                self._unloads.remove(ticket)


def _backoff(failures: int) -> float:
    return float(min(BACKOFF_FIRST_SECONDS * 2**failures, BACKOFF_MAX_SECONDS))
