"""Running exported artifacts: ONNX Runtime sessions plus host-side embeddings and positions.

ort.py        OrtArtifact: load (manifest checks), prepare, prefill, generate, trace
positions.py  each family's position ids in numpy, identical to the HF model's
processor.py  the artifact's preprocessor/ with numpy, PIL and tokenizers (no torch, no transformers)

Nothing under runtime/ (TensorRT's trt.py aside) imports torch or transformers.
"""

from .ort import OrtArtifact

__all__ = ["OrtArtifact"]
