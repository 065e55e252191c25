"""Real-time scoring at the merchant: `fedbehavior serve`, a gRPC service (fedbehavior.v1.Scorer).

`scorer.proto` is the contract; `scorer_pb2*.py` are generated from it (`python -m
client.serving.regenerate`), `events.py` checks request events as the ingest would, `batcher.py`
batches requests into one forward pass, `service.py` is the server, `cli.py` the command.
"""
