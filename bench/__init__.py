"""The performance benchmark of issue 6: `python -m bench` (see bench/README.md)."""
