"""Sequence encoder, scoring heads and state codecs, shared by trainer and serving."""
