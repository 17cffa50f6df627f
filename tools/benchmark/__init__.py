"""Benchmarks against torchvision: python -m tools.benchmark --help."""
