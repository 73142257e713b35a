from ditkit.models.dit import DiT, DiT_models, build_model

__all__ = ["DiT", "DiT_models", "build_model"]
