"""ditkit: Diffusion Transformers (DiT, Peebles & Xie, ICCV 2023) in one PyTorch package.

    import ditkit
    model, cfg = ditkit.load_model("DiT-XL-2-256x256.pt")          # any format
    out = ditkit.sample(model, cfg, labels=[207, 360], cfg_scale=4.0, vae="sd-vae-ft-ema")
    out.images                                                       # (2, 256, 256, 3) uint8

    cfg = ditkit.load_config("digits", ["train.steps=100"])
    ditkit.train(cfg, "runs/digits")

    net = ditkit.DiT_models["DiT-XL/2"](input_size=32)               # the official constructor
"""
from ditkit.checkpoints.load import load_model
from ditkit.config import Config, load_config
from ditkit.generation import Samples, sample
from ditkit.models import DiT, DiT_models, build_model
from ditkit.training.trainer import train

__version__ = "0.2.0"
__all__ = ["Config", "DiT", "DiT_models", "Samples", "build_model", "load_config", "load_model", "sample", "train",
           "__version__"]
