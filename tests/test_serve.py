"""`fedbehavior serve`: scores equal `predict` on the same events, health and reflection, validation
errors naming the field, deadlines, streaming, TLS, graceful shutdown, hot reload under load, and
generated code that matches a fresh build from the proto."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.evaluation.predict import predict
from client.serving import scorer_pb2, scorer_pb2_grpc
from client.serving.cli import add_serve_cli, options_of
from client.serving.events import EventReader, RequestError
from client.serving.service import SERVICE, ScoringServer, ServeOptions, start_server
from tests.trained_run import make_run

# (customer, session, time, behavior, title, category, price): a duplicate row, an alias (pv), a shop
# event name with no funnel role (promo_page: role other) and a session given out of time order
EVENTS = [
    ("c1", "s1", "2026-01-01T10:00:00Z", "view", "iphone 12", "phones", 5999.0),
    ("c1", "s1", "2026-01-01T10:01:00+00:00", "fav", "iphone 12", "phones", 5999.0),
    ("c1", "s1", "2026-01-01T10:01:00Z", "fav", "iphone 12", "phones", 5999.0),  # duplicate
    ("c2", "s3", "2026-01-01T11:02:00Z", "cart", "书", "books", 20.0),
    ("c2", "s3", "2026-01-01T11:00:00Z", "pv", "书", "books", 20.0),
    ("c1", "s2", "2026-01-02T09:00:00+01:00", "search", "", "", None),
    ("c1", "s2", "2026-01-02T09:00:30+01:00", "promo_page", "", "", None),
]


def request_of(rows: list[tuple[Any, ...]]) -> scorer_pb2.ScoreRequest:
    events = []
    for customer, session, ts, behavior, title, category, price in rows:
        event = scorer_pb2.Event(
            customer_id=customer, session_id=session, timestamp=ts, behavior=behavior, title=title,
            category=category,
        )  # fmt: skip
        if price is not None:
            event.price = price
        events.append(event)
    return scorer_pb2.ScoreRequest(events=events)


def predicted(model: Path, rows: list[tuple[Any, ...]], tmp: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """`fedbehavior predict` on the same events written as a shop's CSV export."""
    lines = ["customer_id,session_id,timestamp,behavior,title,category,price"]
    lines += [",".join("" if v is None else str(v) for v in row) for row in rows]
    (tmp / "export.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = predict(model, tmp / "export.csv", tmp / "scores.jsonl", fmt="csv")
    out = [json.loads(x) for x in Path(report.out).read_text().splitlines()]
    return {(r["customer_id"], r["session_id"]): r for r in out}


def as_dict(response: scorer_pb2.ScoreResponse) -> dict[tuple[str, str], dict[str, float]]:
    return {
        (s.customer_id, s.session_id): {p.label: p.probability for p in s.probabilities}
        for s in response.scores
    }


@pytest.fixture(scope="module")
def runs(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve")
    # two models whose scores differ: the same adapter on unit-length and on plain mean pooling
    return make_run(root / "a", tiny_bert), make_run(root / "b", tiny_bert, pooling="mean")


@pytest.fixture(scope="module")
def server(runs: tuple[Path, Path]) -> Iterator[ScoringServer]:
    running = start_server(runs[0] / "final", ServeOptions(port=0, window_ms=2.0))
    yield running
    running.stop(1.0)


def stub(port: int) -> scorer_pb2_grpc.ScorerStub:
    return scorer_pb2_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


TOKEN = "test-secret-0123456789abcdef"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def token_file(folder: Path) -> Path:
    """A --token-file holding TOKEN (callers send AUTH)."""
    path = folder / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_score_equals_predict(server: ScoringServer, runs: tuple[Path, Path], tmp_path: Path) -> None:
    response = stub(server.port).Score(request_of(EVENTS), timeout=10)
    expected = predicted(runs[0] / "final", EVENTS, tmp_path)
    # one score per (customer, session), sorted; the duplicate counts once, as in the ingest
    assert [(s.customer_id, s.session_id) for s in response.scores] == [
        ("c1", "s1"),
        ("c1", "s2"),
        ("c2", "s3"),
    ]
    assert (
        list(expected) == [("c1", "s1"), ("c1", "s2"), ("c2", "s3")] and expected[("c1", "s1")]["events"] == 2
    )
    for s in response.scores:
        row = expected[(s.customer_id, s.session_id)]
        assert s.label == row["predicted"]
        assert [p.label for p in s.probabilities] == ["no-buy", "buy"]
        for p in s.probabilities:
            assert abs(p.probability - row[f"p_{p.label}"]) <= 1e-6
    # batched with other requests or alone, a session scores the same (padding is masked)
    alone = stub(server.port).Score(request_of(EVENTS[3:5]), timeout=10)
    assert alone.scores[0].probabilities[1].probability == pytest.approx(
        response.scores[2].probabilities[1].probability, abs=1e-6
    )


def test_bf16_is_close_to_predict(server: ScoringServer, runs: tuple[Path, Path], tmp_path: Path) -> None:
    expected = as_dict_of(predicted(runs[0] / "final", EVENTS, tmp_path))
    server.batcher.precision = "bf16"
    try:
        got = as_dict(stub(server.port).Score(request_of(EVENTS), timeout=10))
    finally:
        server.batcher.precision = "fp32"
    assert got.keys() == expected.keys()
    gaps = [abs(got[k][x] - expected[k][x]) for k in got for x in got[k]]
    assert 0 < max(gaps) < 2e-2  # bfloat16 products: close, not equal


def test_stream_answers_each_request_in_order(server: ScoringServer) -> None:
    requests = [request_of(EVENTS[3:5]), request_of(EVENTS[:2])]
    answers = list(stub(server.port).ScoreStream(iter(requests), timeout=10))
    assert [[s.session_id for s in a.scores] for a in answers] == [["s3"], ["s1"]]
    assert as_dict(answers[0]) == as_dict(stub(server.port).Score(requests[0], timeout=10))


def test_health_serving_and_reflection(server: ScoringServer) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(channel)
    assert {SERVICE, "grpc.health.v1.Health"} <= set(database.get_services())
    methods = [m.name for m in database.FindFileContainingSymbol(SERVICE).service[0].method]
    assert methods == ["Score", "ScoreStream", "Reload"]


NO_OFFSET = "has no time or no offset"
BAD = [
    ({1: {"timestamp": "x"}}, "events[1].timestamp: 'x' is not RFC 3339"),
    ({2: {"timestamp": "2026-01-01T10:00:00"}}, f"events[2].timestamp: '2026-01-01T10:00:00' {NO_OFFSET}"),
    ({0: {"timestamp": "1970-01-01T00:00:00Z"}}, "events[0].timestamp: '1970-01-01T00:00:00Z' is outside"),
    ({0: {"customer_id": ""}}, "events[0].customer_id: is empty"),
    ({3: {"session_id": ""}}, "events[3].session_id: is empty"),
    ({0: {"behavior": "", "event_name": ""}}, "events[0].behavior: is empty"),
    ({0: {"price": -1.0}}, "events[0].price: -1.0 is not a non-negative number"),
    ({0: {"behavior": "review"}}, "events[0].behavior: a review event needs `rating` or `review_text`"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_malformed_request_names_the_field(
    server: ScoringServer, change: dict[int, dict[str, Any]], message: str
) -> None:
    request = request_of(EVENTS)
    for i, fields in change.items():
        for name, value in fields.items():
            setattr(request.events[i], name, value)
    with pytest.raises(grpc.RpcError) as err:
        stub(server.port).Score(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(message), err.value.details()


def event(**fields: str) -> scorer_pb2.Event:
    return scorer_pb2.Event(customer_id="c", session_id="s", timestamp="2026-01-01T10:00:00Z", **fields)


def test_empty_request_and_event_names() -> None:
    reader = EventReader({"product_view": "view"})
    with pytest.raises(RequestError, match=r"^events: is empty"):
        reader.events([])
    kinds = [
        {"event_name": "Product_View"},
        {"behavior": "purchase"},
        {"behavior": "shipping", "event_name": "shipping_form"},
    ]
    made = reader.events([event(**kw) for kw in kinds])
    assert [(e.behavior.value, e.event_name, e.name) for e in made] == [
        ("view", "Product_View", "Product View"),  # role from the merchant's map, case folded
        ("buy", "purchase", "purchase"),  # an alias, its name kept as the ingest keeps it
        ("other", "shipping_form", "shipping form"),  # open vocabulary
    ]
    with pytest.raises(RequestError, match=r"^events\[0\]\.behavior: 'shipping' is not a known behaviour"):
        EventReader(strict=True).events([event(behavior="shipping")])


def test_deadline_passed_while_queued_is_not_scored(server: ScoringServer) -> None:
    before = (server.batcher.scored, server.batcher.expired)
    server.batcher.window_s = 0.5  # the first request of a batch waits longer than its deadline
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub(server.port).Score(request_of(EVENTS[:2]), timeout=0.1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):  # the worker notices once its window closes
            if server.batcher.expired > before[1]:
                break
            time.sleep(0.05)
    finally:
        server.batcher.window_s = 0.002
    assert (server.batcher.scored, server.batcher.expired) == (before[0], before[1] + 1)
    assert stub(server.port).Score(request_of(EVENTS[:2]), timeout=10).scores  # still serving


def test_hot_reload_under_load_loses_no_request(runs: tuple[Path, Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(runs[0] / "final", model)
    old, new = (as_dict_of(predicted(r / "final", EVENTS, tmp_path)) for r in runs)
    assert old != new
    running = start_server(model, ServeOptions(port=0, window_ms=2.0, token_file=token_file(tmp_path)))
    results: list[tuple[float, Any]] = []  # (time sent, response or error)
    stop = threading.Event()

    def client() -> None:
        scorer = stub(running.port)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                results.append((sent, as_dict(scorer.Score(request_of(EVENTS), timeout=30, metadata=AUTH))))
            except grpc.RpcError as err:
                results.append((sent, err))

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        while len(results) < 20:
            time.sleep(0.01)
        shutil.rmtree(model)  # a training run writes the new model into the served folder
        shutil.copytree(runs[1] / "final", model)
        reply = stub(running.port).Reload(scorer_pb2.ReloadRequest(), timeout=60, metadata=AUTH)
        swapped, count = time.monotonic(), len(results)
        while len(results) < count + 20:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
        running.stop(5.0)
    assert (reply.generation, reply.task, reply.kind) == (2, "purchase-intent", "adapter")
    errors = [r for _, r in results if isinstance(r, grpc.RpcError)]
    assert not errors, errors[:3]
    for sent, got in results:
        assert close(got, old) or close(got, new)
        if sent > swapped:
            assert close(got, new)
    assert sum(close(got, old) for _, got in results) >= 20
    assert sum(close(got, new) for sent, got in results if sent > swapped) >= 20


def as_dict_of(rows: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    return {k: {"no-buy": r["p_no-buy"], "buy": r["p_buy"]} for k, r in rows.items()}


def close(a: dict[tuple[str, str], dict[str, float]], b: dict[tuple[str, str], dict[str, float]]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k][x] - b[k][x]) <= 1e-6 for k in a for x in a[k])


def test_graceful_shutdown_finishes_in_flight(runs: tuple[Path, Path], tmp_path: Path) -> None:
    running = start_server(runs[0] / "final", ServeOptions(port=0, window_ms=400.0))
    in_flight = stub(running.port).Score.future(request_of(EVENTS[:2]), timeout=30)
    while running.batcher.submitted == 0:  # queued: the worker holds it for the window
        time.sleep(0.005)
    stopper = threading.Thread(target=running.stop, args=(10.0,))
    stopper.start()
    while not running._stopped.is_set():
        time.sleep(0.005)
    context = _FakeContext()
    check = running.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), context)
    assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert [s.session_id for s in in_flight.result().scores] == ["s1"]  # finished, not dropped
    stopper.join()
    with pytest.raises(grpc.RpcError) as err:
        stub(running.port).Score(request_of(EVENTS[:2]), timeout=2)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _FakeContext:
    def set_code(self, code: Any) -> None:
        self.code = code


def test_tls(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from shared.pki import make_dev_certificates

    certs = make_dev_certificates(tmp_path / "pki", ["127.0.0.1"])
    options = ServeOptions(port=0, tls_cert=certs.server_cert, tls_key=certs.server_key)
    running = start_server(runs[0] / "final", options)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes())
        secure = scorer_pb2_grpc.ScorerStub(grpc.secure_channel(f"127.0.0.1:{running.port}", credentials))
        assert [s.session_id for s in secure.Score(request_of(EVENTS[:2]), timeout=10).scores] == ["s1"]
        with pytest.raises(grpc.RpcError):  # plaintext is refused
            stub(running.port).Score(request_of(EVENTS[:2]), timeout=2)
    finally:
        running.stop(1.0)
    with pytest.raises(ValueError, match="TLS needs both"):
        ServeOptions(tls_cert=certs.server_cert)


def test_cli_parses_into_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "m", "--port", "0", "--behavior-map", "product_view=view",
                              "--set", "max-length=64", "--window-ms", "3"])  # fmt: skip
    options = options_of(args)
    assert (options.host, options.port, options.window_ms, options.max_batch) == ("127.0.0.1", 0, 3.0, 32)
    assert dict(options.behavior_map) == {"product_view": "view"} and options.overrides == {"max-length": 64}
    with pytest.raises(ValueError, match="--max-batch"):
        options_of(parser.parse_args(["serve", "--model", "m", "--max-batch", "0"]))


def test_generated_code_is_up_to_date() -> None:
    import tomllib

    from client.serving.regenerate import GRPCIO_TOOLS_VERSION, stale

    dev = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["dev"]
    assert f"grpcio-tools=={GRPCIO_TOOLS_VERSION}" in dev
    assert stale() == []


def test_command_reloads_on_sighup_and_drains_on_sigterm(runs: tuple[Path, Path]) -> None:
    import os
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-m", "client.serving.cli", "--model", str(runs[0] / "final"), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs: list[str] = []

    def wait_for(text: str) -> None:
        for _ in range(600):
            if any(text in line for line in logs):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in the server's log: {logs}")

    assert process.stdout is not None and process.stderr is not None
    reader = threading.Thread(target=lambda: logs.extend(iter(process.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        line = process.stdout.readline()  # "serving <model> on 127.0.0.1:<port> ..."
        port = int(line.split(" on 127.0.0.1:")[1].split()[0])
        scorer = stub(port)
        first = as_dict(scorer.Score(request_of(EVENTS), timeout=30))
        os.kill(process.pid, signal.SIGHUP)
        wait_for("generation 2")
        assert close(as_dict(scorer.Score(request_of(EVENTS), timeout=30)), first)  # same folder, same scores
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(10)
    wait_for("stopped after 6 batches, 2 requests")  # --max-chunk 1: one pass per session (3 each)


def test_port_in_use_is_a_clear_error(server: ScoringServer, runs: tuple[Path, Path]) -> None:
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.port}.*choose another --port"):
        start_server(runs[0] / "final", ServeOptions(port=server.port))


def test_failed_reload_keeps_the_old_model(runs: tuple[Path, Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(runs[0] / "final", model)
    running = start_server(model, ServeOptions(port=0, token_file=token_file(tmp_path)))
    try:
        scorer = stub(running.port)
        before = as_dict(scorer.Score(request_of(EVENTS), timeout=10, metadata=AUTH))
        (model / "adapter_config.json").write_text("{not json")  # a half-written folder
        with pytest.raises(grpc.RpcError) as err:
            scorer.Reload(scorer_pb2.ReloadRequest(), timeout=30, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details().startswith("reload failed, the old model is kept")
        assert "json" not in err.value.details().lower()  # the cause goes to the log, not the caller
        assert running.slot.current.generation == 1
        assert close(as_dict(scorer.Score(request_of(EVENTS), timeout=10, metadata=AUTH)), before)
    finally:
        running.stop(1.0)
