"""Multimodal inputs: loading images from what clients send (media.py, fetch.py) and the per-prompt limits."""
