"""The Reroute algorithm in eager PyTorch: the reference every exported graph is checked against.

scoring.py  last-row attention scores at a decision layer (DESIGN.md 1, "Scoring")
select.py   top-K with documented tie-breaking, kept-index construction
cache.py    per-layer KV cache whose length differs by stage
engine.py   routed prefill, decode step and greedy generation
"""

from .engine import Prefill, RoutedModel, generate

__all__ = ["Prefill", "RoutedModel", "generate"]
