"""Running exported artifacts: ONNX Runtime sessions plus host-side embeddings and positions.

base.py          the one interface every backend answers (Runtime, Run, State) and greedy decoding over it
ort.py           OrtArtifact: load (manifest checks), prepare, prefill, generate, trace
trt.py           TrtArtifact: the same with TensorRT engines (tensorrt and a GPU, imported lazily)
eager.py         EagerRuntime: the routing engine on the HF model, the reference (torch)
torch_static.py  TorchStaticRuntime: the export's static-shape modules, CUDA graphs on a GPU (torch)
positions.py     the first decoded position (each family's prompt positions: Family.host_positions)
processor.py     the artifact's preprocessor/ with numpy, PIL and tokenizers (no torch, no transformers)

Running an artifact imports neither torch nor transformers: only eager.py and
torch_static.py (the torch backends, full install) and trt.py do. `OrtArtifact` is imported
on first use, so the backend names below cost the CLI's parser no ONNX Runtime import.
"""

from typing import TYPE_CHECKING, Any

# The backends behind runtime.base.Runtime, by the names the CLI and bench records use.
TORCH_BACKENDS = ("torch", "torch-static")  # a loaded model, on its device and in its dtype
ARTIFACT_BACKENDS = ("onnxruntime", "tensorrt")  # an exported artifact folder
BACKENDS = TORCH_BACKENDS + ARTIFACT_BACKENDS

if TYPE_CHECKING:
    from .ort import OrtArtifact


def __getattr__(name: str) -> Any:
    if name == "OrtArtifact":
        from .ort import OrtArtifact

        return OrtArtifact
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ARTIFACT_BACKENDS", "BACKENDS", "OrtArtifact", "TORCH_BACKENDS"]
