"""Training and DP: the DP-SGD loop, the customer-level mechanism, the budget room, frozen features."""
