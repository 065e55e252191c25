"""`fedbehavior serve` under attack and load (issue 21): requests cut into passes of --max-batch
sessions shared fairly, limits refused with the flag that raises them, idle streams closed, token
authentication (Reload always), fixed error texts, and health NOT_SERVING while overloaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import client.serving.batcher as batcher_module
from client.serving import scorer_pb2
from client.serving.cli import add_serve_cli, options_of
from client.serving.service import SERVICE, UNAUTHENTICATED, ScoringServer, ServeOptions, start_server
from tests import test_serve
from tests.test_serve import AUTH, EVENTS, as_dict, request_of, stub, token_file

runs = test_serve.runs  # the two tiny models (module scope: built once for this module too)

LIMITS = {"max_batch": 3, "max_sessions": 40, "max_events": 100, "max_request_bytes": 8000}


def rows_of(n: int, prefix: str = "c") -> list[tuple[Any, ...]]:
    """`n` sessions of two events each (distinct customers), in the shape `request_of` takes."""
    out: list[tuple[Any, ...]] = []
    for i in range(n):
        title = ["iphone 12", "书", "running shoes", "lipstick"][i % 4]
        out.append(
            (f"{prefix}{i:03d}", "s1", f"2026-01-01T10:{i % 60:02d}:00Z", "view", title, "x", 10.0 + i)
        )
        out.append(
            (f"{prefix}{i:03d}", "s1", f"2026-01-01T10:{i % 60:02d}:30Z", "cart", title, "x", 10.0 + i)
        )
    return out


@pytest.fixture(scope="module")
def server(runs: tuple[Path, Path]) -> Iterator[ScoringServer]:
    running = start_server(
        runs[0] / "final",
        ServeOptions(port=0, window_ms=1.0, workers=6, max_streams=3, stream_idle_s=30.0, **LIMITS),
    )
    yield running
    running.stop(1.0)


def refused(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value


def test_oversized_requests_name_their_flag_while_small_ones_are_scored(server: ScoringServer) -> None:
    scorer = stub(server.port)
    small = request_of(EVENTS[:2])
    long_title = [("c1", "s1", "2026-01-01T10:00:00Z", "view", "x" * 9000, "x", 1.0)]
    cases = [
        (request_of(rows_of(41)), "41 sessions, more than the 40", "--max-sessions"),
        (request_of(rows_of(20) * 3), "120 events, more than the 100", "--max-events"),
        (request_of(long_title), "more than 8000", "--max-request-bytes"),
    ]
    for request, limit, flag in cases:
        big = scorer.Score.future(request, timeout=10)
        quick = scorer.Score.future(small, timeout=5)  # sent beside it: scored within its deadline
        with pytest.raises(grpc.RpcError) as err:
            big.result()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert limit in err.value.details() and flag in err.value.details(), err.value.details()
        assert [s.session_id for s in quick.result().scores] == ["s1"]
    # far past the limit, gRPC's own cap answers (still RESOURCE_EXHAUSTED, before any parsing)
    huge = [("c1", "s1", "2026-01-01T10:00:00Z", "view", "x" * 20000, "x", 1.0)]
    assert (
        refused(lambda: scorer.Score(request_of(huge), timeout=5)).code()
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_large_request_is_chunked_and_scores_as_alone(server: ScoringServer) -> None:
    rows = rows_of(10)
    scorer = stub(server.port)
    before = server.batcher.batches
    whole = scorer.Score(request_of(rows), timeout=30)
    passes = server.batcher.batches - before
    assert passes >= 4  # ten sessions, at most three per forward pass
    assert [s.customer_id for s in whole.scores] == sorted(f"c{i:03d}" for i in range(10))
    got = as_dict(whole)
    for i in range(10):
        alone = as_dict(scorer.Score(request_of(rows[2 * i : 2 * i + 2]), timeout=10))
        (key,) = alone
        assert got[key] == pytest.approx(alone[key], abs=1e-6)


def test_a_small_request_is_not_starved_by_a_large_one(
    server: ScoringServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[list[str]] = []
    started = threading.Event()
    real = batcher_module.score

    def recording(trained: Any, inputs: Any, **kw: Any) -> Any:
        passes.append([i.keys["customer_id"] for i in inputs])
        started.set()
        time.sleep(0.02)  # every pass takes a while: the small request arrives mid-way
        return real(trained, inputs, **kw)

    monkeypatch.setattr(batcher_module, "score", recording)
    scorer = stub(server.port)
    big = scorer.Score.future(request_of(rows_of(36, "big")), timeout=60)  # 12 passes of 3
    assert started.wait(10)
    small = scorer.Score(request_of(EVENTS[:2]), timeout=10)
    assert not big.done()  # answered while the large request still had chunks left
    assert [s.customer_id for s in small.scores] == ["c1"]
    assert len(big.result().scores) == 36
    assert all(len(p) <= 3 for p in passes)
    at = next(i for i, p in enumerate(passes) if "c1" in p)
    assert at <= 3, passes  # within a pass or two of its arrival, not after the twelve of the big one


def idle_requests(release: threading.Event, first: scorer_pb2.ScoreRequest | None = None) -> Iterator[Any]:
    if first is not None:
        yield first
    release.wait(30)


def test_streams_per_caller_are_limited_and_score_still_answers(server: ScoringServer) -> None:
    release = threading.Event()
    scorer = stub(server.port)
    calls = [scorer.ScoreStream(idle_requests(release), timeout=30) for _ in range(2)]
    try:
        for _ in range(200):
            if len(server.streams._open) == 2:
                break
            time.sleep(0.02)
        assert len(server.streams._open) == 2
        third = scorer.ScoreStream(idle_requests(release), timeout=10)
        err = refused(lambda: next(third))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams-per-caller" in err.details()
        assert [s.session_id for s in scorer.Score(request_of(EVENTS[:2]), timeout=5).scores] == ["s1"]
    finally:
        release.set()
        for call in calls:
            call.cancel()
    for _ in range(200):
        if not server.streams._open:
            break
        time.sleep(0.02)
    assert not server.streams._open  # their threads are free again


def test_total_streams_are_limited_below_workers(runs: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"--max-streams \(4\) must be below --workers \(4\)"):
        ServeOptions(workers=4, max_streams=4)
    running = start_server(
        runs[0] / "final", ServeOptions(port=0, workers=3, max_streams=1, max_streams_per_caller=5)
    )
    release = threading.Event()
    try:
        scorer = stub(running.port)
        first = scorer.ScoreStream(idle_requests(release, request_of(EVENTS[:2])), timeout=30)
        assert [s.session_id for s in next(first).scores] == ["s1"]
        err = refused(lambda: next(scorer.ScoreStream(idle_requests(release), timeout=10)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams)" in err.details()
        assert scorer.Score(request_of(EVENTS[:2]), timeout=5).scores
    finally:
        release.set()
        running.stop(1.0)


def test_idle_stream_is_closed(runs: tuple[Path, Path]) -> None:
    running = start_server(runs[0] / "final", ServeOptions(port=0, stream_idle_s=0.3))
    release = threading.Event()
    try:
        call = stub(running.port).ScoreStream(idle_requests(release, request_of(EVENTS[:2])), timeout=30)
        assert [s.session_id for s in next(call).scores] == ["s1"]
        started = time.monotonic()
        err = refused(lambda: next(call))  # no second request: closed after the idle time
        assert time.monotonic() - started < 10
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--stream-idle-s" in err.details(), err.details()
        assert running.streams.closed_idle == 1
        for _ in range(100):
            if not running.streams._open:
                break
            time.sleep(0.02)
        assert not running.streams._open
    finally:
        release.set()
        running.stop(1.0)


def test_token_is_required_when_configured(runs: tuple[Path, Path], tmp_path: Path) -> None:
    running = start_server(runs[0] / "final", ServeOptions(port=0, token_file=token_file(tmp_path)))
    try:
        scorer = stub(running.port)
        wrong = (("authorization", "Bearer not-the-secret-at-all"),)
        calls = (
            lambda m: scorer.Score(request_of(EVENTS[:2]), timeout=5, metadata=m),
            lambda m: scorer.Reload(scorer_pb2.ReloadRequest(), timeout=5, metadata=m),
            lambda m: next(scorer.ScoreStream(iter([request_of(EVENTS[:2])]), timeout=5, metadata=m)),
        )
        for metadata in (None, wrong, (("authorization", AUTH[0][1].removeprefix("Bearer ")),)):
            for call in calls:
                err = refused(call, metadata)
                assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        assert running.batcher.submitted == 0 and running.slot.current.generation == 1
        assert scorer.Score(request_of(EVENTS[:2]), timeout=5, metadata=AUTH).scores
        assert scorer.Reload(scorer_pb2.ReloadRequest(), timeout=30, metadata=AUTH).generation == 2
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        check = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)  # open
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(1.0)
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ValueError, match=r"--token-file .* at least 16"):
        start_server(runs[0] / "final", ServeOptions(port=0, token_file=tmp_path / "short"))


def test_reload_without_a_token_file_is_refused(server: ScoringServer) -> None:
    err = refused(lambda: stub(server.port).Reload(scorer_pb2.ReloadRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--token-file" in err.details() and "SIGHUP" in err.details()
    assert server.slot.current.generation == 1


def test_off_loopback_needs_authentication(runs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0 is off loopback.*--token-file.*--tls-client-ca"):
        start_server(runs[0] / "final", ServeOptions(host="0.0.0.0", port=0))
    running = start_server(
        runs[0] / "final", ServeOptions(host="0.0.0.0", port=0, token_file=token_file(tmp_path))
    )
    try:
        assert stub(running.port).Score(request_of(EVENTS[:2]), timeout=5, metadata=AUTH).scores
    finally:
        running.stop(1.0)


def test_internal_errors_carry_no_exception_text(
    server: ScoringServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret-path /home/shop/key.pem")

    for name in ("score", "inputs_of"):  # failing in the forward pass, or while preparing the inputs
        with monkeypatch.context() as patch:
            patch.setattr(batcher_module, name, broken)
            err = refused(lambda: stub(server.port).Score(request_of(EVENTS[:2]), timeout=10))
        assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "scoring failed")
        assert "secret" not in (err.debug_error_string() or "")
    assert "secret-path" in caplog.text  # the details are in the server's log
    assert stub(server.port).Score(request_of(EVENTS[:2]), timeout=10).scores  # still serving


def test_health_not_serving_while_overloaded(
    runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real = batcher_module.score

    def held(trained: Any, inputs: Any, **kw: Any) -> Any:
        gate.wait(30)
        return real(trained, inputs, **kw)

    monkeypatch.setattr(batcher_module, "score", held)
    running = start_server(
        runs[0] / "final", ServeOptions(port=0, window_ms=0.0, max_batch=1, overload_sessions=4)
    )
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))

    def status(name: str) -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status)

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        assert status(SERVICE) == serving
        big = stub(running.port).Score.future(request_of(rows_of(8)), timeout=60)
        for _ in range(200):
            if status(SERVICE) == not_serving:
                break
            time.sleep(0.02)
        assert status(SERVICE) == not_serving and running.batcher.overloaded
        assert status("") == serving  # the process is alive: only the Scorer says "not now"
        gate.set()
        assert len(big.result().scores) == 8
        assert status(SERVICE) == serving and not running.batcher.overloaded
    finally:
        gate.set()
        running.stop(1.0)


def test_cli_limits_and_their_defaults() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_cli(parser.add_subparsers(dest="command"))
    options = options_of(parser.parse_args(["serve", "--model", "m"]))
    defaults = ServeOptions()
    names = ("max_sessions", "max_events", "max_request_bytes", "max_streams_per_caller", "max_streams",
             "stream_idle_s", "overload_sessions", "token_file", "tls_client_ca")  # fmt: skip
    assert [getattr(options, n) for n in names] == [getattr(defaults, n) for n in names]
    args = ["serve", "--model", "m", "--max-sessions", "9", "--max-events", "99",
            "--max-request-bytes", "999", "--max-streams-per-caller", "1", "--max-streams", "3",
            "--stream-idle-s", "5",
            "--overload-sessions", "0", "--token-file", "t", "--host", "0.0.0.0"]  # fmt: skip
    options = options_of(parser.parse_args(args))
    assert [getattr(options, n) for n in names] == [9, 99, 999, 1, 3, 5.0, 0, Path("t"), None]
    with pytest.raises(ValueError, match="--token-file"):
        options_of(parser.parse_args(["serve", "--model", "m", "--host", "0.0.0.0"]))
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    assert "(default: 256)" in serve.format_help() and "(default: 30.0)" in serve.format_help()


def test_one_request_fills_at_most_max_chunk_of_a_pass() -> None:
    """Passes hold up to --max-batch sessions across requests, but at most --max-chunk of one: a large
    request goes a chunk at a time and the small one queued behind it shares the very next pass."""
    from client.serving.batcher import Batcher, Loaded, ModelSlot, Pending

    slot = ModelSlot(Loaded(trained=cast(Any, None), folder="", generation=1))
    batcher = Batcher(slot, max_batch=8, max_chunk=3)
    try:
        big, small = (
            Pending(slot.current, cast(Any, list(range(10))), None),
            Pending(slot.current, cast(Any, [0]), None),
        )
        with batcher._cond:  # filled and taken under the worker's lock, never notified: it stays asleep
            batcher._pending += [big, small]
            batcher._queued_inputs += 11
            first = [(p is big, start, stop) for p, start, stop in batcher._take()]
            second = [(p is big, start, stop) for p, start, stop in batcher._take()]
            batcher._pending.clear()
            batcher._queued_inputs = 0
    finally:
        batcher.close()
    assert first == [(True, 0, 3), (False, 0, 1)]
    assert second == [(True, 3, 6)]


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 11.0, 1), (16, 3.2, 13), (16, 40.0, 1), (1, 0.0, 1)],
)
def test_serve_takes_the_cores_the_load_leaves_free(cores: int, load: float, expected: int) -> None:
    from client.serving.cli import default_threads

    assert default_threads(cores, load) == expected
