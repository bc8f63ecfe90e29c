"""Generation backends behind one interface: Hugging Face (everywhere) and vLLM (GPU clusters, lazy)."""

from igds_ray.generation.base import GenerationBackend, Intervention, SamplingConfig, make_backend

__all__ = ["GenerationBackend", "Intervention", "SamplingConfig", "make_backend"]
