"""Every packaged preset loads, validates and builds its network on the meta device (no memory); the recipes
that aim at a published model have its size, and the recipes after 2023 say what they change."""
import pytest
import torch

from ditkit.config import load_config, preset_names
from ditkit.models.dit import build_model

# Parameters of the published models (the papers' tables): DiT-XL/2 and SiT-XL/2 675M; LightningDiT-XL/1 is
# DiT-XL's 28 blocks of 1152 too (its RMSNorm weights and frozen sin-cos table, which ditkit's rmsnorm and rope
# options leave out, add 0.36M).
PUBLISHED = {"imagenet256": 675e6, "imagenet512": 675e6, "lightningdit256": 675e6, "repa256": 675e6}


def built(name: str):
    cfg = load_config(name)
    with torch.device("meta"):
        model = build_model(cfg.model.name, **cfg.model.kwargs())
    return cfg, model


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_on_the_meta_device(name):
    cfg, model = built(name)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("repa_"))
    if name in PUBLISHED:
        assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 1e-3, count


def test_the_lightningdit_recipe():
    cfg, model = built("lightningdit256")
    m, o, t = cfg.model, cfg.objective, cfg.train
    assert (m.pos_embed, m.norm, m.mlp, m.patch_size) == ("rope", "rmsnorm", "swiglu", 1)
    assert (m.in_channels, m.input_size, m.learn_sigma) == (32, 16, False)
    assert (o.name, o.time_sampling, o.logit_mean, o.logit_std, o.cos_weight) == ("flow", "logit_normal", 0.0, 1.0, 1.0)
    assert (t.lr, t.adam_betas, t.global_batch_size, cfg.data.latent_norm) == (2e-4, [0.9, 0.95], 1024, "channel")
    assert sum(p.numel() for p in model.parameters()) == 674_896_160


def test_the_repa_recipe():
    cfg, model = built("repa256")
    m = cfg.model
    assert (m.name, m.repa_depth, m.repa_dim, cfg.objective.repa_weight) == ("DiT-XL/2", 8, 768, 0.5)
    assert cfg.objective.name == "flow" and cfg.train.repa_encoder is not None
    assert sum(p.numel() for p in model.repa_projector.parameters()) == 8_131_328
