"""Coordinator side: adapter aggregation, checkpoints, metrics and the ServerApp."""
