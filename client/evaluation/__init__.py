"""Evaluation and personalisation: noisy releases, the local baseline, the kept global model,
personalisation, predict."""
