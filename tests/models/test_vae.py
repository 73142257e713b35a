"""The SD VAE: the real sd-vae-ft config (randomly initialised, on 16×16 images so the CPU copes),
loaded by load_vae from every supported layout, and encode/decode in DiT's 0.18215 units."""
import re

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

from ditkit.models.vae import LATENT_SCALE, decode, encode, load_vae, to_uint8  # noqa: E402


@pytest.fixture(scope="module")
def saved(vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-vae-ft-ema")
    vae.save_pretrained(folder)
    return folder


def same_weights(a, b):
    """a, b: modules or state dicts."""
    sa, sb = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_real_config_has_the_published_size(vae):
    n = sum(p.numel() for p in vae.parameters())
    assert n == 83_653_863  # stabilityai/sd-vae-ft-ema: 83.65M parameters
    assert vae.config.scaling_factor == LATENT_SCALE == 0.18215


def test_load_from_folders(vae, saved, tmp_path):
    loaded = load_vae(saved)
    assert same_weights(loaded, vae) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    # a whole pipeline folder: the VAE lives in vae/
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "vae").symlink_to(saved, target_is_directory=True)
    assert same_weights(load_vae(tmp_path / "pipeline"), vae)
    # a Hugging Face cache entry: models--org--name/snapshots/<revision>/
    snap = tmp_path / "models--stabilityai--sd-vae-ft-ema" / "snapshots"
    snap.mkdir(parents=True)
    (snap / "0123abc").symlink_to(saved, target_is_directory=True)
    assert same_weights(load_vae(snap.parent), vae)
    half = load_vae(saved, dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def to_ldm_keys(sd):
    """diffusers → original Stable Diffusion (CompVis ldm) names, written from ldm's Encoder/Decoder."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"down_blocks\.(\d)\.resnets\.(\d)", r"down.\1.block.\2", k)
        k = re.sub(r"down_blocks\.(\d)\.downsamplers\.0", r"down.\1.downsample", k)
        k = re.sub(r"up_blocks\.(\d)\.resnets\.(\d)", lambda m: f"up.{3 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"up_blocks\.(\d)\.upsamplers\.0", lambda m: f"up.{3 - int(m[1])}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("conv_norm_out", "norm_out").replace("attn_1.group_norm", "attn_1.norm")
        for new, old in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f"attn_1.{new}.", f"attn_1.{old}.")
        if "attn_1." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # ldm's attention projections are 1×1 convolutions
        out["first_stage_model." + k] = v
    return out


def test_load_from_a_single_file(vae, tmp_path):
    """Weights files in diffusers naming and in the original SD naming (float16, as published)."""
    half = {k: v.half() for k, v in vae.state_dict().items()}
    save_file(half, str(tmp_path / "vae.safetensors"))
    torch.save({"state_dict": to_ldm_keys(half)}, tmp_path / "vae-ft-ema-560000-ema-pruned.ckpt")
    for name in ("vae.safetensors", "vae-ft-ema-560000-ema-pruned.ckpt"):
        loaded = load_vae(tmp_path / name, dtype=torch.float16)
        assert same_weights(loaded, half), name
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert next(load_vae(tmp_path / "vae.safetensors").parameters()).dtype == torch.float32


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"VAE path .*nowhere does not exist: download .*sd-vae-ft-ema"):
        load_vae(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"no VAE in .*no config.json.*sd-vae-ft-ema"):
        load_vae(tmp_path)
    (tmp_path / "vae.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"vae.npz should end in one of \.safetensors"):
        load_vae(tmp_path / "vae.npz")
    small = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match=r"small.safetensors does not fit the SD VAE"):
        load_vae(tmp_path / "small.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other.safetensors is not an AutoencoderKL state dict"):
        load_vae(tmp_path / "other.safetensors")


def test_encode_decode_in_dit_units(vae):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = encode(vae, x)
    assert mean.shape == std.shape == (2, 4, 2, 2) and mean.dtype == torch.float32
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        # DiT's train.py: x = vae.encode(x).latent_dist.sample().mul_(0.18215)
        z_dit = dist.sample(generator=torch.Generator().manual_seed(3)) * 0.18215
        images = vae.decode(dist.mean).sample
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, z_dit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, dist.std * 0.18215)
    out = decode(vae, mean)  # decode divides by 0.18215 again
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, images.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    # a batch decoded one latent at a time (GroupNorm is per sample): the same images
    torch.testing.assert_close(decode(vae, mean, chunk=1), out, rtol=1e-4, atol=1e-5)


def test_to_uint8_matches_dit_sample_ddp():
    k = torch.arange(256, dtype=torch.float64)
    x = (k / 127.5 - 1).float()  # pixel k in [-1, 1]: 127.5·x + 128 = k + 0.5, truncated to k
    x = x.view(1, 1, 1, 256).expand(2, 3, 4, 256)
    out = to_uint8(x)
    assert out.shape == (2, 4, 256, 3) and out.dtype == torch.uint8
    assert torch.equal(out[0, 0, :, 0], k.to(torch.uint8))
    clipped = torch.full((1, 3, 1, 2), -3.0)
    clipped[..., 1] = 3.0
    assert to_uint8(clipped).tolist() == [[[[0, 0, 0], [255, 255, 255]]]]
