"""Inference node: serves generation and embedding models over gRPC."""
