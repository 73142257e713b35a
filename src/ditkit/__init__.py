"""ditkit: Diffusion Transformers, the official DiT made fast, tested and complete."""
from ditkit.models import DiT, DiT_models, build_model

__version__ = "0.1.0"
__all__ = ["DiT", "DiT_models", "build_model", "__version__"]
