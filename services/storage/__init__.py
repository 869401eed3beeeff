"""Durable files: atomic writes and .npy files."""
