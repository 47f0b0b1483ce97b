"""Serving and training benchmarks; each writes benchmarks/results/<name>.json and a Markdown table."""
