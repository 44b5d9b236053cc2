"""Readable PyTorch reference implementations of the RWKV generations (the numerical truth)."""
