"""The merchant's side, laid out by its jobs.

- `client.ingest`: the merchant's data (ingest an export, read and validate the store, labels, preview).
- `client.training`: training and DP (the DP-SGD loop, the customer-level mechanism, the budget room).
- `client.evaluation`: evaluation and personalisation (noisy releases, baseline, personalise, predict).
- `client.serving`: real-time scoring (`fedbehavior merchant serve`, gRPC).
- `client.daemon`: the daemon and trust (the SuperNode, its warm executor, the approved apps).

On top sit the edges: `client.app` (Flower's ClientApp), `client.cli` (the commands),
`client.merchant` (one round, as plain functions) and `client.settings` (`merchant.toml`).
"""
