"""The daemon and trust: the merchant's SuperNode, its warm executor, and the apps it approved."""
