"""The gRPC server: `fedbehavior.v1.Scorer`, the standard health service and server reflection.

- Score / ScoreStream: validate (INVALID_ARGUMENT naming the field), queue on the dynamic batcher
  (chunks of at most --max-batch sessions, shared fairly between callers), wait at most until the
  caller's deadline (DEADLINE_EXCEEDED; a request whose deadline passes while queued is not scored),
  answer one SessionScore per (customer_id, session_id), sorted.
- Limits, each refused with RESOURCE_EXHAUSTED naming the flag that raises it: --max-sessions and
  --max-events per request, --max-request-bytes per message, --max-streams-per-caller (per peer
  address) and --max-streams in all (below --workers, so that unary Score always finds a handler
  thread), --stream-idle-s (a stream with no request for that long is closed and frees its thread),
  --max-queue requests queued.
- Authentication: with --token-file, every Scorer call carries `authorization: Bearer <secret>`
  (compared in constant time), else UNAUTHENTICATED. Off loopback the server refuses to start
  without --token-file or mutual TLS (--tls-client-ca). Reload always needs the token: without a
  token file it is refused (use SIGHUP). Health and reflection stay open.
- Errors a caller sees carry a fixed text (INTERNAL "scoring failed"); the details go to the log.
- Health (`grpc.health.v1.Health`): SERVING for "" and "fedbehavior.v1.Scorer" once the model is
  loaded; "fedbehavior.v1.Scorer" is NOT_SERVING while more than --overload-sessions sessions are
  queued (SERVING again below half of it); everything NOT_SERVING from the moment a shutdown starts,
  so a load balancer drains the instance.
- Hot reload (the Reload RPC, or SIGHUP to `fedbehavior serve`): the model folder is loaded again in
  full beside the one in service, then swapped in; a failed load keeps the old model (the log says why).
- Runtime (--runtime): torch (eager, the default), onnx or onnx-int8 (ONNX Runtime on the CPU with
  --threads threads, client.training.onnx_backbone): the graph is exported (or read from its cache) when the
  model is loaded or reloaded, never on the scoring path.
- Shutdown (`stop`, SIGTERM/SIGINT in the CLI): NOT_SERVING, refuse new RPCs, let those in flight
  finish within the grace period, then stop the batcher.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.serving import scorer_pb2, scorer_pb2_grpc
from client.serving.batcher import Batcher, Loaded, ModelSlot, Overloaded, Pending
from client.serving.events import MAX_EVENTS, MAX_SESSIONS, EventReader, LimitError, RequestError
from shared.trained import Trained, load_trained

if TYPE_CHECKING:
    from client.training.onnx_backbone import OnnxRunner

log = logging.getLogger(__name__)

SERVICE = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name  # "fedbehavior.v1.Scorer"
LOOPBACK = ("127.0.0.1", "::1", "localhost", "[::1]")
UNAUTHENTICATED = "missing or wrong token: send metadata 'authorization: Bearer <secret of --token-file>'"
RELOAD_NEEDS_TOKEN = (
    "Reload over RPC needs a token: start the server with --token-file, or send SIGHUP to its process"
)
SCORING_FAILED = "scoring failed"


@dataclass
class ServeOptions:
    """How `serve` runs: address, batching, threads, TLS and the merchant's behaviour names."""

    host: str = "127.0.0.1"  # loopback unless asked: the scores are the merchant's customers' data
    port: int = 50051  # 0: any free port (tests)
    max_batch: int = 32  # sessions per forward pass
    max_chunk: int = 1  # sessions of one request per forward pass (its share while others wait)
    window_ms: float = 4.0  # how long the first request of a batch waits for company
    max_queue: int = 1024  # queued requests beyond which RESOURCE_EXHAUSTED is answered
    workers: int = 16  # gRPC handler threads (they mostly wait on the batcher)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    behavior_map: Mapping[str, str] = field(default_factory=dict)
    strict: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)  # run-config keys, as for predict
    device: str = "cpu"
    precision: str = "fp32"  # or bf16: see client.serving.batcher.PRECISIONS
    runtime: str = "torch"  # or onnx, onnx-int8: see client.training.onnx_backbone.RUNTIMES
    threads: int = 0  # ONNX Runtime's intra-op threads (0: its default); torch's are set by the CLI
    onnx_cache: Path | None = None  # exported graphs (None: client.training.onnx_backbone.cache_root())
    max_sessions: int = MAX_SESSIONS  # sessions (customer, session ids) per request
    max_events: int = MAX_EVENTS  # events per request
    max_request_bytes: int = 4 * 1024 * 1024  # one request message, serialized
    max_streams_per_caller: int = 2  # open ScoreStream calls per peer address
    max_streams: int = 8  # open ScoreStream calls in all: below `workers`, so that Score keeps threads
    stream_idle_s: float = 30.0  # a stream with no request for that long is closed
    overload_sessions: int = 1024  # queued sessions past which health says NOT_SERVING (0: never)
    token_file: Path | None = None  # callers send `authorization: Bearer <the file's secret>`
    tls_client_ca: Path | None = None  # mutual TLS: callers present a certificate this CA signed

    def __post_init__(self) -> None:
        from client.training.onnx_backbone import check_runtime

        check_runtime(self.runtime)  # a missing onnxruntime is named before the model loads
        if self.runtime != "torch":
            if self.device != "cpu":
                raise ValueError(f"--runtime {self.runtime} runs on the CPU: drop --device {self.device} "
                                 "or use --runtime torch")  # fmt: skip
            if self.precision != "fp32":
                raise ValueError(f"--precision {self.precision} is a torch setting: with --runtime "
                                 f"{self.runtime} drop it (onnx-int8 is ONNX's faster one)")  # fmt: skip
        if self.threads < 0:
            raise ValueError("--threads must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (PEM files), or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port (0..65535)")
        for name in ("max_sessions", "max_events", "max_request_bytes", "max_streams_per_caller"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.max_streams < self.workers:
            raise ValueError(
                f"--max-streams ({self.max_streams}) must be below --workers ({self.workers}): "
                "each open stream holds a handler thread, unary Score needs some left"
            )
        if self.stream_idle_s <= 0 or self.overload_sessions < 0:
            raise ValueError("--stream-idle-s must be > 0 and --overload-sessions >= 0")
        if self.host not in LOOPBACK and self.token_file is None and self.tls_client_ca is None:
            raise ValueError(
                f"--host {self.host} is off loopback: callers must authenticate. Pass --token-file PATH "
                "(callers send 'authorization: Bearer <secret>') or mutual TLS (--tls-client-ca with "
                "--tls-cert/--tls-key)"
            )


def read_token(path: Path) -> bytes:
    """The secret of a --token-file (surrounding whitespace dropped); a clear error if unusable."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as err:
        raise ValueError(f"--token-file {path}: cannot read it ({err.strerror})") from None
    if len(token) < 16:
        raise ValueError(f"--token-file {path}: the secret must be at least 16 characters")
    return token


def _refuse(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A method handler of the same shape as `handler` that answers `code` at once."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Scorer calls need `authorization: Bearer <token>` when a token is set; Reload always does."""

    def __init__(self, token: bytes | None) -> None:
        self.expected = None if token is None else b"Bearer " + token

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        method = details.method or ""
        if not method.startswith(f"/{SERVICE}/"):
            return continuation(details)  # health and reflection stay open
        if self.expected is None:
            if method == f"/{SERVICE}/Reload":
                return _refuse(continuation(details), grpc.StatusCode.PERMISSION_DENIED, RELOAD_NEEDS_TOKEN)
            return continuation(details)
        sent = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                sent = value if isinstance(value, str) else ""
        if not hmac.compare_digest(sent.encode("utf-8", "replace"), self.expected):
            return _refuse(continuation(details), grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        return continuation(details)


def caller_of(peer: str) -> str:
    """The peer's address without its port (ipv4:10.0.0.7:53121 -> 10.0.0.7): what limits count."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


class StreamLimit(RuntimeError):
    """Too many open streams (per caller or in all): RESOURCE_EXHAUSTED."""


@dataclass(eq=False)
class Stream:
    """An open ScoreStream: its caller, when it was last active, and how to close it."""

    caller: str
    close: Callable[[], None]
    last: float = field(default_factory=time.monotonic)
    busy: bool = False  # scoring a request: not idle
    pending: Pending | None = None

    def touch(self, busy: bool = False) -> None:
        self.last, self.busy = time.monotonic(), busy


class StreamGuard:
    """Counts open streams per caller and in all, and closes those idle for longer than `idle_s`."""

    def __init__(self, per_caller: int, total: int, idle_s: float) -> None:
        self.per_caller, self.total, self.idle_s = per_caller, total, idle_s
        self._lock = threading.Lock()
        self._open: set[Stream] = set()
        self._by_caller: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedbehavior-streams", daemon=True)
        self._thread.start()
        self.closed_idle = 0  # for logs and tests

    def open(self, caller: str, close: Callable[[], None]) -> Stream:
        with self._lock:
            if self._by_caller[caller] >= self.per_caller:
                raise StreamLimit(
                    f"{self._by_caller[caller]} streams already open from {caller}, the most one caller "
                    "may hold (the server's --max-streams-per-caller); reuse one"
                )
            if len(self._open) >= self.total:
                raise StreamLimit(
                    f"{len(self._open)} streams already open, the most the server holds "
                    "(the server's --max-streams); retry later or use Score"
                )
            stream = Stream(caller, close)
            self._open.add(stream)
            self._by_caller[caller] += 1
            return stream

    def release(self, stream: Stream) -> None:
        with self._lock:
            if stream in self._open:
                self._open.remove(stream)
                self._by_caller[stream.caller] -= 1
                if not self._by_caller[stream.caller]:
                    del self._by_caller[stream.caller]
        if stream.pending is not None:
            stream.pending.cancel()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.idle_s / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._open if not s.busy and now - s.last > self.idle_s]
            for stream in idle:
                log.info("closing a stream from %s: idle for %.0f s", stream.caller, now - stream.last)
                self.closed_idle += 1
                self.release(stream)
                stream.close()

    def stop(self) -> None:
        self._stop.set()


def _cancel(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End a call from outside its handler thread with `code` and `message` (plain cancel if not)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)  # grpc's server call object
    try:
        call.cancel(code.value[0], message)  # type: ignore[union-attr]
    except Exception:
        context.cancel()


def _response(rows: list[dict[str, Any]], labels: tuple[str, ...]) -> scorer_pb2.ScoreResponse:
    scores = [
        scorer_pb2.SessionScore(
            session_id=str(row.get("session_id", "")),
            customer_id=str(row["customer_id"]),
            label=str(row["predicted"]),
            probabilities=[
                scorer_pb2.LabelProbability(label=label, probability=row[f"p_{label}"]) for label in labels
            ],
        )
        for row in rows
    ]
    return scorer_pb2.ScoreResponse(scores=scores)


class ScorerServicer(scorer_pb2_grpc.ScorerServicer):
    """Score, ScoreStream and Reload on top of a Batcher."""

    def __init__(
        self,
        batcher: Batcher,
        reader: EventReader,
        reload: Callable[[], Loaded],
        streams: StreamGuard,
        max_request_bytes: int = ServeOptions.max_request_bytes,
    ) -> None:
        self.batcher, self.reader, self._reload = batcher, reader, reload
        self.streams, self.max_request_bytes = streams, max_request_bytes

    def _score(
        self, request: scorer_pb2.ScoreRequest, context: grpc.ServicerContext, stream: Stream | None = None
    ) -> Any:
        size = request.ByteSize()
        if size > self.max_request_bytes:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {size} bytes, more than {self.max_request_bytes} "
                "(the server's --max-request-bytes); split the request",
            )
        try:
            events = self.reader.events(request.events)
        except LimitError as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except RequestError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        left = context.time_remaining()
        deadline = None if left is None else time.monotonic() + left
        try:
            pending = self.batcher.submit(events, deadline)
        except Overloaded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Exception:
            log.exception("preparing a request of %d events failed", len(events))
            context.abort(grpc.StatusCode.INTERNAL, SCORING_FAILED)
        if stream is None:
            context.add_callback(pending.cancel)  # the caller went away: no further chunk
        else:
            stream.pending = pending
        try:
            loaded, rows = pending.result.result(timeout=left)
        except (TimeoutError, futures.TimeoutError):
            pending.cancel()  # not scored if still queued, no further chunk if started
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request was scored"
            )
        except futures.CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled before the request was scored")
        except Exception:
            log.exception("scoring a request of %d sessions failed", pending.size)
            context.abort(grpc.StatusCode.INTERNAL, SCORING_FAILED)
        finally:
            if stream is not None:
                stream.pending = None
        return _response(rows, loaded.trained.task.labels)

    def Score(self, request: scorer_pb2.ScoreRequest, context: grpc.ServicerContext) -> Any:
        return self._score(request, context)

    def ScoreStream(
        self, request_iterator: Iterator[scorer_pb2.ScoreRequest], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        idle = (
            f"the stream had no request for {self.streams.idle_s:g} s "
            "(the server's --stream-idle-s); open a new one when needed"
        )
        try:
            stream = self.streams.open(
                caller_of(context.peer()),
                lambda: _cancel(context, grpc.StatusCode.RESOURCE_EXHAUSTED, idle),
            )
        except StreamLimit as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        context.add_callback(lambda: self.streams.release(stream))
        try:
            for request in request_iterator:
                stream.touch(busy=True)
                try:
                    response = self._score(request, context, stream)
                finally:
                    stream.touch()
                yield response
                stream.touch()
        except grpc.RpcError:  # cancelled: by its caller, or closed idle
            return
        finally:
            self.streams.release(stream)

    def Reload(self, request: scorer_pb2.ReloadRequest, context: grpc.ServicerContext) -> Any:
        try:
            loaded = self._reload()
        except Exception:  # the old model stays in service
            log.exception("reload failed; the old model stays in service")
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "reload failed, the old model is kept; the server's log says why",
            )
        return describe(loaded)


def describe(loaded: Loaded) -> scorer_pb2.ReloadResponse:
    """The model in service, as the Reload RPC reports it."""
    trained = loaded.trained
    return scorer_pb2.ReloadResponse(
        model=loaded.folder, kind=trained.kind, task=trained.task.name, generation=loaded.generation
    )


class ScoringServer:
    """A running server: its port, `reload()` and `stop()`. Build one with `start_server`."""

    def __init__(self, folder: Path, options: ServeOptions, load: Callable[[str], Trained]) -> None:
        self.options, self._load = options, load
        trained, runner = self._open(str(folder))
        self.slot = ModelSlot(Loaded(trained, str(folder), 1, runner))
        token = None if options.token_file is None else read_token(options.token_file)
        reader = EventReader(
            options.behavior_map,
            strict=options.strict,
            max_events=options.max_events,
            max_sessions=options.max_sessions,
        )
        self.health = health.HealthServicer()
        self.batcher = Batcher(
            self.slot,
            max_batch=options.max_batch,
            max_chunk=options.max_chunk,
            window_s=options.window_ms / 1000,
            max_queue=options.max_queue,
            precision=options.precision,
            overload_sessions=options.overload_sessions,
            on_overload=self._overloaded,
        )
        self.streams = StreamGuard(options.max_streams_per_caller, options.max_streams, options.stream_idle_s)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="fedbehavior-grpc"),
            interceptors=[TokenInterceptor(token)],
            options=[
                ("grpc.so_reuseport", 0),
                # gRPC's own cap, above the limit the handler checks so that its refusal names the flag
                ("grpc.max_receive_message_length", 2 * options.max_request_bytes + 4096),
            ],
        )
        servicer = ScorerServicer(self.batcher, reader, self.reload, self.streams, options.max_request_bytes)
        scorer_pb2_grpc.add_ScorerServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self._stopped = threading.Event()
        self.port = self._bind(f"{options.host}:{options.port}")

    def _open(self, path: str) -> tuple[Trained, OnnxRunner | None]:
        """The model of `path` and, for an ONNX runtime, its session (exported or read from the cache)."""
        trained = self._load(path)
        if self.options.runtime == "torch":
            return trained, None
        from client.training.onnx_backbone import onnx_runner

        runner = onnx_runner(
            trained.model,
            self.options.runtime,
            threads=self.options.threads,
            cache_dir=self.options.onnx_cache,
        )
        return trained, runner

    def _overloaded(self, overloaded: bool) -> None:
        """Health of the Scorer service follows the queue (ignored once a shutdown started)."""
        status = health_pb2.HealthCheckResponse
        if not self._stopped.is_set():
            self.health.set(SERVICE, status.NOT_SERVING if overloaded else status.SERVING)

    def _bind(self, address: str) -> int:
        options = self.options
        try:
            if options.tls_cert is not None and options.tls_key is not None:
                pair = (Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes())
                if options.tls_client_ca is not None:  # mutual TLS: callers need a certificate of this CA
                    credentials = grpc.ssl_server_credentials(
                        [pair], root_certificates=Path(options.tls_client_ca).read_bytes(),
                        require_client_auth=True,
                    )  # fmt: skip
                else:
                    credentials = grpc.ssl_server_credentials([pair])
                port = self.server.add_secure_port(address, credentials)
            else:
                if options.host not in LOOPBACK:
                    log.warning("serving %s without TLS: the token travels in clear; "
                                "pass --tls-cert/--tls-key", address)  # fmt: skip
                port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc raises on a failed bind in recent releases, returns 0 in older ones
            port = 0
        if not port:
            self.batcher.close()
            self.streams.stop()
            raise OSError(f"cannot listen on {address}: the port is in use or the host is not local; "
                          "choose another --port / --host")  # fmt: skip
        return int(port)

    def start(self) -> ScoringServer:
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        loaded = self.slot.current
        log.info(
            "serving %s (%s, task %s, runtime %s) on %s:%d", loaded.folder, loaded.trained.kind,
            loaded.trained.task.name, self.options.runtime, self.options.host, self.port,
        )  # fmt: skip
        return self

    def reload(self) -> Loaded:
        """Load the model folder again and swap it in (the old one serves until the swap)."""
        loaded = self.slot.reload(self._open)
        log.info(
            "reloaded %s: generation %d, task %s", loaded.folder, loaded.generation, loaded.trained.task.name
        )
        return loaded

    def stop(self, grace_s: float = 10.0) -> None:
        """NOT_SERVING, refuse new RPCs, finish those in flight (within `grace_s`), stop the batcher."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.batcher.close()
        self.streams.stop()
        log.info("stopped after %d batches, %d requests", self.batcher.batches, self.batcher.scored)

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(folder: Path, options: ServeOptions | None = None) -> ScoringServer:
    """Load the model in `folder` (a run's final/, the run folder, or an export) and start serving it."""
    options = options or ServeOptions()
    overrides = dict(options.overrides)

    def load(path: str) -> Trained:
        return load_trained(Path(path), overrides=overrides, device=options.device)

    if not Path(folder).exists():
        raise FileNotFoundError(
            f"--model {folder} does not exist; pass runs/<name>/final or an export folder"
        )
    return ScoringServer(Path(folder), options, load).start()
