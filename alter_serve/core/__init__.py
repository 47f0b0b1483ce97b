"""Shared by training and serving: the adapter bundle, views and the base-model fingerprint.

Imports no web code and no vLLM, so `train` can depend on it freely.
"""
