"""Score shop sessions with a running `fedbehavior merchant serve`, with only code generated from the proto.

In a folder of your own, with `scorer.proto` and this file:

    pip install grpcio grpcio-tools
    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. scorer.proto
    python score_client.py 127.0.0.1:50051                       # plaintext, on the serving host
    python score_client.py shop-ml:50051 --ca ca.crt --token-file token   # TLS and a bearer token

It prints one JSON object per scored session (or customer, for the customer tasks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
import scorer_pb2
import scorer_pb2_grpc


def request() -> scorer_pb2.ScoreRequest:
    """Two sessions of one customer, as the shop logged them."""
    events = [
        scorer_pb2.Event(
            customer_id="c1", session_id="s1", timestamp="2026-01-01T10:00:00Z",
            behavior="view", item_id="sku-12", title="iphone 12", category="phones", price=5999.0,
        ),
        scorer_pb2.Event(
            customer_id="c1", session_id="s1", timestamp="2026-01-01T10:01:30Z",
            behavior="fav", item_id="sku-12", title="iphone 12", category="phones", price=5999.0,
        ),
        scorer_pb2.Event(
            customer_id="c1", session_id="s2", timestamp="2026-01-02T09:00:00+01:00",
            event_name="promo_page",  # the shop's own event name: the role comes from it (other)
        ),
        scorer_pb2.Event(
            customer_id="c1", session_id="s2", timestamp="2026-01-02T09:00:40+01:00",
            behavior="search", query="phone case",
        ),
    ]  # fmt: skip
    return scorer_pb2.ScoreRequest(events=events)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score sessions with fedbehavior merchant serve.")
    parser.add_argument("address", help="host:port of the server")
    parser.add_argument("--ca", type=Path, help="CA certificate of a TLS server (omit for plaintext)")
    parser.add_argument("--token-file", type=Path, help="file holding the server's bearer token")
    args = parser.parse_args(argv)

    metadata = []
    if args.token_file:
        metadata.append(("authorization", f"Bearer {args.token_file.read_text().strip()}"))
    if args.ca:
        channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(args.ca.read_bytes()))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        try:
            response = stub.Score(request(), timeout=10, metadata=metadata)
        except grpc.RpcError as err:  # INVALID_ARGUMENT names the field; RESOURCE_EXHAUSTED the flag
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    for score in response.scores:
        probabilities = {p.label: p.probability for p in score.probabilities}
        print(
            json.dumps(
                {
                    "customer_id": score.customer_id,
                    "session_id": score.session_id,
                    "label": score.label,
                    "probabilities": probabilities,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
