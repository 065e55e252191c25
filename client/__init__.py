"""Merchant side: local data, DP-SGD training and evaluation, and the ClientApp."""
