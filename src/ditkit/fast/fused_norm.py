"""adaLN-Zero's LayerNorm, modulation and gated residual as operators with hand-written kernels.

In a DiT block

    h₁ = LN(x)(1 + γ₁) + β₁                  modulated_norm(x, β₁, γ₁)
    x  = x + α₁ ⊙ Attn(h₁)
    h₂ = LN(x)(1 + γ₂) + β₂                  both lines: residual_modulated_norm(x, Attn(h₁), α₁, β₂, γ₂)
    x  = x + α₂ ⊙ MLP(h₂)

Attn's and MLP's last linears (``proj``, ``fc2``) run without their bias b, which the kernel adds
(x + α ⊙ (o + b)); its backward then gives ∂b from one more token sum it keeps in registers, instead of
a reduction over ∂o after it (about 0.4 ms per DiT-XL/2 step at batch 32).  Where the linear is not a
plain or tuned linear (FP8 training's) the module runs whole, and so does the MLP of a block sharded by
FSDP2, whose gathered weights are freed after its forward: fc2's bias would cross to the next block.

Each operator is one Triton kernel forward and one backward (``ditkit.kernels.norm``: the
backward also makes the per-sample sums ∂β, ∂γ, ∂α), opaque to ``torch.compile``.  On a CPU they
compute the same equations with torch's ops.  ``FusedNormBlock`` and ``FusedNormFinalLayer`` hold
the same modules as ``DiTBlock`` and ``FinalLayer`` (same Parameters, same state dict).  In a
converted DiT a block's last residual x + α₂ ⊙ MLP(h₂) is handed on unadded and added by the next
block's (or the final layer's) first operator, so its gradient joins inside that kernel too.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ditkit.fast.fp8_forward import norm_output_scale
from ditkit.fast.fused_attention import FusedAttention
from ditkit.fast.fused_mlp import FusedMlp
from ditkit.fast.swap import compute_dtype, rebuilt_as, replace_module, swap_modules
from ditkit.fast.tuned_linear import TunedLinear
from ditkit.kernels import norm as norm_kernels
from ditkit.models.dit import Attention, DiTBlock, FinalLayer, Mlp

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch built without distributed: no module is FSDP's
    FSDPModule = ()


def _on_triton(x: torch.Tensor) -> bool:
    return norm_kernels.triton is not None and x.is_cuda


@torch.library.custom_op("ditkit::modulated_norm", mutates_args=(),
                         schema="(Tensor x, Tensor? o, Tensor? gate, Tensor? bias, Tensor shift, Tensor scale, "
                                "float eps, ScalarType dtype, Tensor? fp8_scale=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def modulated_norm_op(x, o, gate, bias, shift, scale, eps, dtype, fp8_scale=None):
    """x, o (N, T, D); gate, shift, scale (N, D); bias (D,) -> (x' = x + gate ⊙ (o + bias), or an empty tensor
    without o; h (N, T, D) in ``dtype``; μ and r (N, T) float32; with ``fp8_scale`` s ((1,) float32) h / s in e4m3
    for an FP8 product (``ditkit.fast.fp8_forward``), else an empty tensor)."""
    x, o = x.contiguous(), (o.contiguous() if o is not None else None)
    forward = norm_kernels.forward_triton if _on_triton(x) else norm_kernels.forward_reference
    stream, h, mean, rstd, *q = forward(x, o, gate, bias, shift, scale, eps, dtype, fp8_scale)
    return (stream if stream is not None else x.new_empty(0)), h, mean, rstd, (q[0] if q else x.new_empty(0))


@modulated_norm_op.register_fake
def _(x, o, gate, bias, shift, scale, eps, dtype, fp8_scale=None):
    n, tokens, _ = x.shape
    stream = x.new_empty(x.shape) if o is not None else x.new_empty(0)
    q = x.new_empty(x.shape, dtype=torch.float8_e4m3fn) if fp8_scale is not None else x.new_empty(0)
    return stream, x.new_empty(x.shape, dtype=dtype), x.new_empty(n, tokens, dtype=torch.float32), \
        x.new_empty(n, tokens, dtype=torch.float32), q


@torch.library.custom_op("ditkit::modulated_norm_backward", mutates_args=(),
                         schema="(Tensor gh, Tensor? g_next, Tensor stream, Tensor? o, Tensor? gate, Tensor scale, "
                                "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)")
def modulated_norm_backward_op(gh, g_next, stream, o, gate, scale, mean, rstd):
    """-> (∂x in the stream's dtype; ∂o in o's dtype (empty without o); the token sums (∂β, ∂γ, and with o:
    Σ_t ∂x' ⊙ o, Σ_t ∂x') per slice of tokens, stacked, (2 or 4, N, slices, D) float32: their sum over the
    slices is left to the traced backward, where compile fuses it with the casts and ∂α, ∂b after it)."""
    gh, stream = gh.contiguous(), stream.contiguous()
    g_next = g_next.contiguous() if g_next is not None else None
    o = o.contiguous() if o is not None else None
    if _on_triton(stream):
        dx, do, partial = norm_kernels.backward_partial(gh, g_next, stream, o, gate, scale, mean, rstd,
                                                        (stream.dtype, o.dtype if o is not None else stream.dtype))
    else:
        dx, do, sums = norm_kernels.backward_reference(gh, g_next, stream, o, gate, scale, mean, rstd)
        partial = sums.unsqueeze(2)
    return dx.to(stream.dtype), do.to(o.dtype) if o is not None else stream.new_empty(0), partial


@modulated_norm_backward_op.register_fake
def _(gh, g_next, stream, o, gate, scale, mean, rstd):
    n, tokens, width = stream.shape
    slices = norm_kernels.backward_slices(n, tokens, width, o is not None, stream.device) if _on_triton(stream) else 1
    return (stream.new_empty(stream.shape), o.new_empty(o.shape) if o is not None else stream.new_empty(0),
            stream.new_empty(4 if o is not None else 2, n, slices, width, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, o, gate, bias, shift, scale, *_ = inputs
    stream, _, mean, rstd, q = output
    ctx.residual = o is not None
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(stream if ctx.residual else x, o, gate, bias, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd, q)
    ctx.set_materialize_grads(False)  # an unused x' (the final layer's) gives None, not a tensor of zeros to read


def _backward(ctx, g_stream, gh, _g_mean, _g_rstd, _g_q):
    stream, o, gate, bias, scale, mean, rstd = ctx.saved_tensors
    if gh is None:
        gh = torch.zeros_like(stream)
    g_next = g_stream if ctx.residual else None
    dx, do, partial = modulated_norm_backward_op(gh, g_next, stream, o, gate, scale, mean, rstd)
    sums = partial.sum(2)
    d_shift, d_scale = sums[0].to(ctx.shift_dtype), sums[1].to(scale.dtype)  # traced: compile fuses these casts
    if not ctx.residual:
        return dx, None, None, None, d_shift, d_scale, None, None, None
    if bias is None:
        return dx, do, sums[2].to(gate.dtype), None, d_shift, d_scale, None, None, None
    d_gate = sums[2] + bias.float() * sums[3]  # Σ_t ∂x' ⊙ (o + b)
    d_bias = (gate.float() * sums[3]).sum(0)  # Σ_n α ⊙ Σ_t ∂x' = Σ ∂o
    return dx, do, d_gate.to(gate.dtype), d_bias.to(bias.dtype), d_shift, d_scale, None, None, None


modulated_norm_op.register_autograd(_backward, setup_context=_setup_context)


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   fp8_scale: torch.Tensor | None = None):
    """h = LN(x)(1 + γ) + β: x (N, T, D), shift β and scale γ (N, D) -> h (N, T, D), or with ``fp8_scale`` s
    (h, h / s in e4m3)."""
    # x made contiguous here, in traced code: compiled, the kernel that makes x writes it so (the patch
    # embedding's tokens are a transposed view); inside the operator it would be a copy of its own (inductor
    # hands an operator its inputs in eager's strides), and again in the backward: 0.29 ms per XL/2 b32 step.
    _, h, _, _, q = modulated_norm_op(x.contiguous(), None, None, None, shift, scale, eps, compute_dtype(x), fp8_scale)
    return h if fp8_scale is None else (h, q)


def residual_modulated_norm(x, o, gate, shift, scale, eps: float, bias: torch.Tensor | None = None,
                            fp8_scale: torch.Tensor | None = None):
    """x' = x + α ⊙ (o + b) (b: o's bias, if given) and h = LN(x')(1 + γ) + β -> (x', h), or with ``fp8_scale`` s
    (x', h, h / s in e4m3)."""
    stream, h, _, _, q = modulated_norm_op(x.contiguous(), o.contiguous(), gate, bias, shift, scale, eps,
                                           compute_dtype(x), fp8_scale)
    return (stream, h) if fp8_scale is None else (stream, h, q)


#################################################################################
#                        The block and final layer using them                   #
#################################################################################


class PendingResidual(NamedTuple):
    """A block's output x + α ⊙ (o + b) not yet added: the next block's (or the final layer's) first norm
    adds it inside its kernel, and in the backward the residual's gradient joins there too."""
    x: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    bias: torch.Tensor | None = None


def _norm_of_input(x: torch.Tensor | PendingResidual, shift, scale, eps: float, fp8_scale=None):
    """(the block's input stream, its modulated norm), and with ``fp8_scale`` that norm in e4m3."""
    if isinstance(x, PendingResidual):
        return residual_modulated_norm(x.x, x.o, x.gate, shift, scale, eps, x.bias, fp8_scale)
    h = modulated_norm(x, shift, scale, eps, fp8_scale)
    return (x, h) if fp8_scale is None else (x, *h)


def _fp8_norm(x, shift, scale, eps: float, o=None, gate=None, bias=None):
    """The block's norm with h's FP8 copy for the product after it: (x', h, (q, s_h)), x' = x without o."""
    s = norm_output_scale(shift, scale)
    x, h, q = (_norm_of_input(x, shift, scale, eps, s) if o is None
               else residual_modulated_norm(x, o, gate, shift, scale, eps, bias, s))
    return x, h, (q, s)


def _without_last_bias(module: nn.Module, h: torch.Tensor, h_fp8=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``module(h)`` less the bias of its last linear, that bias), or (``module(h)``, None) where the last
    linear is not an ``nn.Linear`` or ``TunedLinear`` with a bias (FP8 training's runs whole).  ``h_fp8``: h in
    FP8 for a ``FusedMlp`` (see ``FusedMlp.forward``)."""
    last = module.proj if isinstance(module, Attention) else getattr(module, "fc2", None)
    if isinstance(module, FusedMlp) and h_fp8 is not None:
        return (module(h, with_bias=False, x_fp8=h_fp8), last.bias) if last.bias is not None else \
            (module(h, x_fp8=h_fp8), None)
    if type(last) not in (nn.Linear, TunedLinear) or last.bias is None:
        return (module(h) if h_fp8 is None else module.proj(module.attend(h, h_fp8))), None
    if isinstance(module, FusedMlp):
        return module(h, with_bias=False), last.bias
    if isinstance(module, (Attention, Mlp)):
        inner = (module.attend(h) if h_fp8 is None else module.attend(h, h_fp8)) if isinstance(module, Attention) \
            else module.hidden(h)
        out = last(inner, with_bias=False) if isinstance(last, TunedLinear) else nn.functional.linear(inner, last.weight)
        return out, last.bias
    return module(h), None


class FusedNormBlock(DiTBlock):
    """``DiTBlock`` whose LayerNorms, modulations and gated residuals run through the operators above.
    With ``defer_residual`` (set by ``convert_to_fused_norm`` where a fused block or final layer comes
    next) it returns its last residual as a ``PendingResidual``."""

    defer_residual = False
    fp8_forward = False  # fc1's and qkv's forward in FP8 (``enable_fp8_forward``)

    def forward(self, x, c: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None):
        if mask is not None:
            raise ValueError("fused_norm blocks take no padding mask: the speed recipe leaves them out for masked runs")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        fp8_attn = self.fp8_forward and isinstance(self.attn, FusedAttention) and context is None
        fp8_mlp = self.fp8_forward and isinstance(self.mlp, FusedMlp) and context is None
        h_fp8 = None
        if fp8_attn:
            x, h, h_fp8 = _fp8_norm(x, shift_msa, scale_msa, self.norm1.eps)
        else:
            x, h = _norm_of_input(x, shift_msa, scale_msa, self.norm1.eps)
        if context is None:
            a, a_bias = _without_last_bias(self.attn, h, h_fp8)
            if fp8_mlp:
                x, h, h_fp8 = _fp8_norm(x, shift_mlp, scale_mlp, self.norm2.eps, a, gate_msa, a_bias)
            else:
                h_fp8 = None
                x, h = residual_modulated_norm(x, a, gate_msa, shift_mlp, scale_mlp, self.norm2.eps, a_bias)
        else:
            x = x + gate_msa.unsqueeze(1) * self.attn(h)
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
            h = modulated_norm(x, shift_mlp, scale_mlp, self.norm2.eps)
        if self.defer_residual:
            # Under FSDP2 this block's gathered weights are freed after its forward, so fc2's bias cannot be
            # handed to the next block (which reads it there and in its backward): the MLP adds it itself.
            if isinstance(self, FSDPModule):  # FSDP2 hooks the output tensors for the backward: none may be a view
                return PendingResidual(*(t.clone() if t._is_view() else t for t in (x, self.mlp(h), gate_mlp)))
            m, m_bias = _without_last_bias(self.mlp, h, h_fp8)
            return PendingResidual(x, m, gate_mlp, m_bias)
        return x + gate_mlp.unsqueeze(1) * (self.mlp(h, x_fp8=h_fp8) if h_fp8 is not None else self.mlp(h))


class FusedNormFinalLayer(FinalLayer):
    """``FinalLayer`` whose LayerNorm and modulation (and a pending residual) run through the operators above."""

    def forward(self, x, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_norm_of_input(x, shift, scale, self.norm_final.eps)[1])


_FUSED = {DiTBlock: FusedNormBlock, FinalLayer: FusedNormFinalLayer}


def _layer_norms(module: nn.Module) -> bool:
    """Whether the norms of a block or final layer are the LayerNorms the kernels compute."""
    norms = [getattr(module, k) for k in ("norm1", "norm2", "norm_final") if hasattr(module, k)]
    return all(type(n) is nn.LayerNorm for n in norms)


def convert_to_fused_norm(model: nn.Module, defer_residual: bool = True) -> int:
    """Replace every ``DiTBlock`` and ``FinalLayer`` by its fused form holding the same modules; returns how
    many.  In a DiT, with ``defer_residual``, each block hands its last residual to the next block (or the
    final layer) pending, except where the model touches the tokens in between (in-context conditioning
    drops its extra tokens after the last block).  Pass ``defer_residual=False`` for a model whose blocks
    are recomputed in the backward (activation checkpointing): there a pending residual would keep two
    (N, T, D) tensors per block instead of one.  Blocks whose norms are not LayerNorm (RMSNorm) are left
    alone: the kernels compute LayerNorm."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) in _FUSED and _layer_norms(m)]
    for name, m in targets:
        replace_module(model, name, rebuilt_as(_FUSED[type(m)], m))
    converted = len(targets)
    blocks = getattr(model, "blocks", None)
    if (defer_residual and isinstance(blocks, nn.ModuleList)
            and isinstance(getattr(model, "final_layer", None), FusedNormFinalLayer)):
        deferring = list(blocks)[:-1] if getattr(model, "cond_mode", "adaln") == "in_context" else list(blocks)
        for block in deferring:
            if isinstance(block, FusedNormBlock):
                block.defer_residual = True
    return converted


def revert_fused_norm(model: nn.Module) -> int:
    """Undo ``convert_to_fused_norm``; returns how many."""
    return swap_modules(model, {fused: plain for plain, fused in _FUSED.items()})
