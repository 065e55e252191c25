"""The gRPC server: `fedbehavior.v1.Scorer`, the standard health service and server reflection.

- Score / ScoreStream: validate (INVALID_ARGUMENT naming the field), queue on the dynamic batcher,
  wait at most until the caller's deadline (DEADLINE_EXCEEDED; a request whose deadline passes while
  queued is not scored), answer one SessionScore per (customer_id, session_id), sorted.
- Health (`grpc.health.v1.Health`): SERVING for "" and "fedbehavior.v1.Scorer" once the model is
  loaded, NOT_SERVING from the moment a shutdown starts, so a load balancer drains the instance.
- Hot reload (the Reload RPC, or SIGHUP to `fedbehavior serve`): the model folder is loaded again in
  full beside the one in service, then swapped in; a failed load keeps the old model and says why.
- Shutdown (`stop`, SIGTERM/SIGINT in the CLI): NOT_SERVING, refuse new RPCs, let those in flight
  finish within the grace period, then stop the batcher.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.serving import scorer_pb2, scorer_pb2_grpc
from client.serving.batcher import Batcher, Loaded, ModelSlot, Overloaded
from client.serving.events import EventReader, RequestError
from shared.trained import Trained, load_trained

log = logging.getLogger(__name__)

SERVICE = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name  # "fedbehavior.v1.Scorer"


@dataclass
class ServeOptions:
    """How `serve` runs: address, batching, threads, TLS and the merchant's behaviour names."""

    host: str = "127.0.0.1"  # loopback unless asked: the scores are the merchant's customers' data
    port: int = 50051  # 0: any free port (tests)
    max_batch: int = 32  # sessions per forward pass
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

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (PEM files), or neither")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port (0..65535)")


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

    def __init__(self, batcher: Batcher, reader: EventReader, reload: Callable[[], Loaded]) -> None:
        self.batcher, self.reader, self._reload = batcher, reader, reload

    def _score(self, request: scorer_pb2.ScoreRequest, context: grpc.ServicerContext) -> Any:
        try:
            events = self.reader.events(request.events)
        except RequestError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        left = context.time_remaining()
        deadline = None if left is None else time.monotonic() + left
        try:
            pending = self.batcher.submit(events, deadline)
        except Overloaded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        try:
            loaded, rows = pending.result(timeout=left)
        except (TimeoutError, futures.TimeoutError):
            pending.cancel()  # not scored if still queued
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request was scored"
            )
        except Exception as err:
            context.abort(grpc.StatusCode.INTERNAL, f"scoring failed: {err}")
        return _response(rows, loaded.trained.task.labels)

    def Score(self, request: scorer_pb2.ScoreRequest, context: grpc.ServicerContext) -> Any:
        return self._score(request, context)

    def ScoreStream(
        self, request_iterator: Iterator[scorer_pb2.ScoreRequest], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        for request in request_iterator:
            yield self._score(request, context)

    def Reload(self, request: scorer_pb2.ReloadRequest, context: grpc.ServicerContext) -> Any:
        try:
            loaded = self._reload()
        except Exception as err:  # the old model stays in service
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"reload failed, the old model is kept: {err}")
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
        self.slot = ModelSlot(Loaded(load(str(folder)), str(folder), 1))
        self.batcher = Batcher(
            self.slot,
            max_batch=options.max_batch,
            window_s=options.window_ms / 1000,
            max_queue=options.max_queue,
            precision=options.precision,
        )
        reader = EventReader(options.behavior_map, strict=options.strict)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="fedbehavior-grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        scorer_pb2_grpc.add_ScorerServicer_to_server(
            ScorerServicer(self.batcher, reader, self.reload), self.server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self._bind(f"{options.host}:{options.port}")
        self._stopped = threading.Event()

    def _bind(self, address: str) -> int:
        options = self.options
        try:
            if options.tls_cert is not None and options.tls_key is not None:
                pair = (Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes())
                port = self.server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
            else:
                if options.host not in ("127.0.0.1", "localhost", "::1"):
                    log.warning("serving %s without TLS: pass --tls-cert/--tls-key off loopback", address)
                port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc raises on a failed bind in recent releases, returns 0 in older ones
            port = 0
        if not port:
            self.batcher.close()
            raise OSError(f"cannot listen on {address}: the port is in use or the host is not local; "
                          "choose another --port / --host")  # fmt: skip
        return int(port)

    def start(self) -> ScoringServer:
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        loaded = self.slot.current
        log.info(
            "serving %s (%s, task %s) on %s:%d", loaded.folder, loaded.trained.kind,
            loaded.trained.task.name, self.options.host, self.port,
        )  # fmt: skip
        return self

    def reload(self) -> Loaded:
        """Load the model folder again and swap it in (the old one serves until the swap)."""
        loaded = self.slot.reload(self._load)
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
