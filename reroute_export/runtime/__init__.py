"""Running exported artifacts: ONNX Runtime sessions plus host-side embeddings and positions.

ort.py        OrtArtifact: load (manifest checks), prepare, prefill, generate, trace
positions.py  each family's position ids in numpy, identical to the HF model's
"""

from .ort import OrtArtifact

__all__ = ["OrtArtifact"]
