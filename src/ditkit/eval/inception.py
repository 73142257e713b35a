"""The FID InceptionV3: the TensorFlow 2015 ImageNet graph that FID, sFID and IS are defined on.

This is the network of ``classify_image_graph_def.pb`` (inception-2015-12-05), which ADM's
evaluation suite and TTUR's FID run in TensorFlow, written in plain torch with pytorch-fid's
parameter names so that its port of the weights loads as is:

    pt_inception-2015-12-05-6726825d.pth   (a plain state dict, 2048 → 1008 classifier)
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

Nothing is downloaded here: the user fetches that file once and passes its path (``ditkit eval
--inception PATH``, or the environment variable ``DITKIT_INCEPTION``).

It differs from torchvision's InceptionV3 where the 2015 graph does: every 3×3 average pool of a
pooling branch ignores the zero padding (count_include_pad=False), and the last block (Mixed_7c)
pools its pool branch with a max instead of an average.

Outputs, per image:
- ``pool``:    (2048,) pool3, the FID features (ADM's ``pool_3:0``).
- ``spatial``: (2023,) ADM's sFID features, ``mixed_6/conv:0[..., :7]``.  In the 2015 graph the
  17×17 blocks are mixed_4..mixed_7 (torchvision's Mixed_6b..6e), so mixed_6 is Mixed_6d and its
  first conv is the 1×1 branch (conv, batch norm, ReLU), whose 192 channels come first in the
  block's output.  Flattened in TensorFlow's (H, W, C) order: 17·17·7.  This reading of the TF
  node name is ours; it has not been checked against the TF graph's tensor here.
- ``probs``:   (1008,) softmax of pool3 · Wᵀ — the classifier's weights without its bias, over
  all 1008 outputs (1000 ImageNet classes and 8 unused ones).  That is what the original IS
  code (openai/improved-gan) and ADM's ``_create_softmax_graph`` compute, so IS is comparable.

Input: uint8 (N, H, W, 3) images.  ``resize="pytorch-fid"`` (default) does what pytorch-fid
does: x/255, bilinear resize to 299×299 (``F.interpolate``, align_corners=False, half-pixel
centres, no antialias), then 2x − 1.  ``resize="tf1"`` does what the graph does with the
0..255 images ADM feeds it (as torch-fidelity's port of the graph reads it): TensorFlow 1.x
``ResizeBilinear`` (align_corners=False, no half-pixel centres, float32), then (x − 128)/128.  It
is written from TF's kernel and checked against its closed form, not against a TensorFlow run.

How the numbers relate to ADM's TF suite (the one behind the DiT paper's tables): the weights are
the TF graph's, ported.  pytorch-fid's README reports that the port gives the TF outputs to ~1e-8
mean absolute error on identical inputs, and FIDs 0.08 apart (0.0009 relative) on LSUN with ProGAN
samples, the rest coming from image resizing and library backends.  For sFID, IS, precision and
recall we know of no published comparison, and none has been measured here (no TensorFlow and no
real weights on this machine): expect differences of that order, and compare only numbers
computed with the same evaluator and resize mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
WEIGHTS_ENV = "DITKIT_INCEPTION"  # where ditkit eval looks for the weights file when --inception is not given
INPUT_SIZE = 299
RESIZE_MODES = ("pytorch-fid", "tf1")


class BasicConv2d(nn.Module):
    """conv (no bias) → batch norm (ε = 1e-3, TF's) → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME-padded average pool divides by the number of real pixels, not 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """35×35 -> 17×17 reduction: 384 + 96 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions -> 768 channels, the 1×1 branch first."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """17×17 -> 8×8 reduction: 320 + 192 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3 / 3×1 outputs -> 2048 channels.  ``max_pool``: the 2015 graph's
    last block pools its pool branch with a 3×3 max (a quirk of that graph, kept for fidelity)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 of the TF 2015 graph.  forward: (N, 3, 299, 299) in [-1, 1] -> dict of
    ``pool`` (N, 2048), ``spatial`` (N, 2023) and ``probs`` (N, 1008), see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        x = self.Mixed_6d(x)
        # mixed_6/conv: channels 0..191 of Mixed_6d are its 1×1 branch; ADM keeps 7 of them.
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 17·17·7) in TF's HWC order
        x = self.Mixed_7a(self.Mixed_6e(x))  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        probs = torch.softmax(pool @ self.fc.weight.T, dim=1)  # (N, 1008), no bias: as the IS code
        return {"pool": pool, "spatial": spatial, "probs": probs}


# -- input --------------------------------------------------------------------------------------

def _tf1_resize_weights(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF 1.x legacy bilinear sampling: source coordinate = dst · (n_in / n_out) in float32."""
    src = torch.arange(n_out, device=device, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.floor()
    frac = src - lo
    hi = src.ceil().clamp(max=n_in - 1)
    return lo.long(), hi.long(), frac


def resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) as TF 1.x ResizeBilinear(align_corners=False)."""
    lo, hi, f = _tf1_resize_weights(x.shape[2], size, x.device)
    top, bottom = x[:, :, lo], x[:, :, hi]
    x = top + (bottom - top) * f[:, None]  # rows
    lo, hi, f = _tf1_resize_weights(x.shape[3], size, x.device)
    left, right = x[..., lo], x[..., hi]
    return left + (right - left) * f  # columns


def preprocess(images: torch.Tensor, resize: str = "pytorch-fid") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, 299, 299) in [-1, 1], resized as ``resize`` says."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in 0..255
    if resize == "pytorch-fid":
        x = F.interpolate(x / 255.0, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if resize == "tf1":
        return (resize_tf1(x, INPUT_SIZE) - 128) / 128
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


# -- weights ------------------------------------------------------------------------------------

def weights_hint() -> str:
    """Where the weights come from and how to pass them, for an error line."""
    return (f"download {WEIGHTS_FILE} (the pytorch-fid port of the TF 2015 FID network) from {WEIGHTS_URL} "
            f"and pass --inception PATH (or set {WEIGHTS_ENV}=PATH); "
            "nothing is downloaded automatically")


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Builds the network and loads the state dict at ``path`` (pytorch-fid's weights file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"InceptionV3 weights not found at {path}: {weights_hint()}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, an HTML page, a pickle of something else
        raise ValueError(f"{path} is not a readable torch state dict ({e}); expected {WEIGHTS_FILE} from {WEIGHTS_URL}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; expected {WEIGHTS_FILE}")

    model = FIDInceptionV3()
    # num_batches_tracked is training bookkeeping: files saved without it load the same.
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(given[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        details = "; ".join(f"{name}: {len(keys)} (e.g. {keys[0]})" for name, keys in
                            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys)
        raise ValueError(f"{path} is not the FID InceptionV3 state dict ({details}); expected {WEIGHTS_FILE} from {WEIGHTS_URL}")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False).to(device)


@contextmanager
def full_fp32():
    """Float32 convolutions and matmuls in IEEE float32 inside the block.  cuDNN runs float32
    convolutions in TF32 (10-bit mantissa) by default on Ampere and later GPUs; the TF graph that
    defines the metrics ran in full float32.  Measured on an H100 (random weights, 64 images):
    pool3 is 5.6e-4 off float64 in TF32, 1.3e-6 in IEEE float32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: torch.Tensor, resize: str = "pytorch-fid") -> dict[str, torch.Tensor]:
    """uint8 (N, H, W, 3) -> {"pool": (N, 2048), "spatial": (N, 2023), "probs": (N, 1008)}, float32
    on the model's device, computed without TF32."""
    device = next(model.parameters()).device
    with full_fp32():
        return model(preprocess(images.to(device), resize))
