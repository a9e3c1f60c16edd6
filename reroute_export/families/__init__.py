"""Model families: each module registers one declarative `Family` with the registry."""

from . import llava, qwen2_5_vl  # noqa: F401  (registration side effect)
