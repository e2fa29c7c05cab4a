"""Collisionless hash embedding store (Monolith-style): admission, expiry, eviction, checkpoints."""
