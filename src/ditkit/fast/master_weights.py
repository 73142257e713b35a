"""bf16 weights with float32 master copies (``TrainSpeed.master_weights``): the end of a training step in
two passes over flat buffers instead of five over ~1,450 tensors.

Under bf16 autocast the linears and convolutions compute with bf16 copies of their float32 weights:
autocast casts every weight on every forward (read 4 bytes, write 2), and each bf16 weight gradient
is cast back to float32 (read 2, write 4).  Then the gradient norm reads 4 bytes, fused AdamW 28
and the EMA 12: 56 bytes per parameter per step.  Here those layers hold their weights in bf16 —
the very numbers autocast would have made — and the optimizer keeps the float32 master weights,
moments and EMA in flat buffers.  A step takes the gradients' sum of squares (2 bytes) and runs one
kernel for AdamW, the EMA and the new bf16 weights (34: the master is the bf16 weight and a 16-bit
remainder): 36 bytes, read from the gradients where autograd left them (``ditkit.kernels.master``).
For DiT-XL/2 (675 M parameters) that is 13 GB less traffic per step.

What the model computes is unchanged: the same bf16 weights, the same bf16 gradients (their
float32 cast is exact), AdamW and the EMA in float32 on the master weights (kept as the bf16 weight and
a 16-bit remainder; an exact rounding tie, ~1 in 131,072 elements per step, moves its master one float32
step toward the weight: ``master_kernels``).  Parameters autocast
does not cast (embedding tables, norms' affine weights) stay float32 and are updated by the same
kernel from a float32 flat buffer.  Checkpoints hold the float32 master weights and torch AdamW's
state layout, so runs move freely between this and the plain optimizer.

Several micro-batches and processes: autograd sums a step's micro-batches into the bf16 gradients
(one bf16 rounding per micro-batch after the first, where the plain path adds in float32); DDP
averages them over the processes in float32 and rounds once (``float32_allreduce_hook``).  Under FSDP
this optimizer is not used: FSDP2's mixed precision keeps sharded float32 masters itself.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

from ditkit.fast.swap import AUTOCAST_CAST
from ditkit.kernels import master as master_kernels


def float32_allreduce_hook(state, bucket):
    """A DDP communication hook: the bucket's gradients averaged over the ranks in float32, then written
    back in the bucket's dtype (bf16 here): ḡ = round_bf16(Σ_r float32(g_r) / world)."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    total = buffer.float().div_(dist.get_world_size())
    future = dist.all_reduce(total, async_op=True).get_future()

    def written_back(fut):
        return buffer.copy_(fut.value()[0])

    return future.then(written_back)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor, min(1, max_norm / (‖g‖ + 1e-6)); 1 without clipping."""
    if max_norm <= 0:
        return torch.ones_like(norm)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


@dataclass
class FlatGroup:
    """Parameters laid end to end (``layout``: where each starts): ``master``, the moments and the EMA,
    each one flat tensor.  With ``weights`` (bf16) the model's parameters are views of it and ``master``
    is the int16 remainder that completes them to the float32 masters (``master_kernels.split_master``);
    without, ``master`` is float32 and the parameters are views of it."""
    params: list[nn.Parameter]
    names: list[str]
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    ema: torch.Tensor
    weights: torch.Tensor | None
    layout: master_kernels.FlatLayout

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` cut into the parameters' shapes."""
        return [flat[start:start + p.numel()].view(p.shape) for p, start in zip(self.params, self.layout.offsets)]

    def masters(self) -> list[torch.Tensor]:
        """The float32 master weights, one tensor per parameter (views without ``weights``, else new tensors)."""
        if self.weights is None:
            return self.views(self.master)
        return [master_kernels.join_master(w, lo) for w, lo in zip(self.views(self.weights), self.views(self.master))]


def _flat_group(named: list[tuple[str, nn.Parameter]], ema_params: list[nn.Parameter], low: torch.dtype | None) -> FlatGroup:
    params = [p for _, p in named]
    layout = master_kernels.flat_layout([p.numel() for p in params], params[0].device)
    zeros = functools.partial(torch.zeros, layout.size, device=params[0].device)
    group = FlatGroup(params, [n for n, _ in named], zeros(dtype=torch.int16 if low is not None else torch.float32),
                      zeros(), zeros(), zeros(), zeros(dtype=low) if low is not None else None, layout)
    for p, e, ema in zip(params, ema_params, group.views(group.ema)):
        ema.copy_(e.detach())
    if group.weights is not None:
        for p, w, lo in zip(params, group.views(group.weights), group.views(group.master)):
            halves = master_kernels.split_master(p.detach())
            w.copy_(halves[0])
            lo.copy_(halves[1])
    else:
        for p, master in zip(params, group.views(group.master)):
            master.copy_(p.detach())
    for p, view in zip(params, group.views(group.weights if group.weights is not None else group.master)):
        p.data = view  # the model now computes with (and autograd writes gradients for) these
    for e, view in zip(ema_params, group.views(group.ema)):
        e.data = view  # the EMA model reads its weights from the flat buffer the kernel updates
    return group


def step_scalars(norm: torch.Tensor, step_count: torch.Tensor, lr: float, betas: tuple[float, float], weight_decay: float,
                 max_norm: float, ema_decay: float) -> torch.Tensor:
    """master_kernels.SCALARS for a step, on the device: the clip coefficient (0 when the norm is not
    finite), the skip flag, lr·λ, lr / (1 − β₁ˢ), √(1 − β₂ˢ) (bias corrections in double precision,
    as torch's fused AdamW) and 1 − decay; ``step_count`` is s, already advanced."""
    ok = torch.isfinite(norm)
    clip = torch.where(ok, clip_coefficient(norm, max_norm), torch.zeros_like(norm))
    s = step_count.double()
    bc1, bc2 = 1 - betas[0] ** s, 1 - betas[1] ** s
    one = torch.ones_like(norm)
    return torch.stack([clip, ok.float(), one * (lr * weight_decay), (lr / bc1).float(), bc2.sqrt().float(),
                        one * (1 - ema_decay)])


def _use_kernels(t: torch.Tensor) -> bool:
    """The Triton kernels on a GPU, or in Triton's interpreter where it is switched on (the tests)."""
    return master_kernels.triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on float32 master weights with the EMA update, for a model whose autocast-cast layers
    (``AUTOCAST_CAST``) now hold bf16 weights.  ``step`` also clips (``max_norm`` > 0), skips a
    non-finite step on the device and updates ``ema``; it returns the gradient norm (no host sync).
    Set ``ema_decay`` before each step."""

    updates_ema = True  # the trainer sets ``ema_decay`` and skips its own EMA update
    skip: torch.Tensor | None = None

    def __init__(self, model: nn.Module, ema: nn.Module, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_norm: float = 0.0):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("MasterWeightAdamW: the model has no trainable parameters")
        if any(p.dtype != torch.float32 for _, p in named):
            raise ValueError("MasterWeightAdamW: the model's trainable parameters must start in float32")
        ema_named = dict(ema.named_parameters())
        for n, p in named:
            if n not in ema_named or ema_named[n].shape != p.shape:
                raise ValueError(f"MasterWeightAdamW: the EMA model's {n!r} is missing or has another shape")
        super().__init__([p for _, p in named], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        cast = {id(p) for m in model.modules() if isinstance(m, AUTOCAST_CAST) for p in m.parameters(recurse=False)}
        self.groups = []
        for low in (torch.bfloat16, None):
            part = [(n, p) for n, p in named if (id(p) in cast) == (low is not None)]
            if part:
                self.groups.append(_flat_group(part, [ema_named[n] for n, _ in part], low))
        self.order = [p for _, p in named]  # torch AdamW's parameter order, for the state dict
        self.max_norm = max_norm
        self.ema_decay = 0.9999
        self.step_count = torch.zeros((), device=self.groups[0].master.device)

    @torch.no_grad()
    def step(self, closure=None) -> torch.Tensor:  # noqa: D102 - see the class
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        if len(self.param_groups) != 1:
            raise ValueError("MasterWeightAdamW supports one parameter group")
        for g in self.groups:
            if any(p.grad is None for p in g.params):
                name = g.names[next(i for i, p in enumerate(g.params) if p.grad is None)]
                raise RuntimeError(f"MasterWeightAdamW: {name} has no gradient (a module unused in the forward?)")
        group = self.param_groups[0]
        grads = [[p.grad for p in g.params] for g in self.groups]
        kernels = _use_kernels(self.groups[0].master)
        if kernels:  # each table is built once and kept (with any contiguous copies) until both kernels are queued
            tables = [master_kernels.pointer_table(gr, g.master.device) for gr, g in zip(grads, self.groups)]
            sums = [master_kernels.sum_squares_triton(t, gr[0].dtype, g.layout)
                    for (t, _), gr, g in zip(tables, grads, self.groups)]
        else:
            sums = [master_kernels.sum_squares_reference(gr, g.layout) for gr, g in zip(grads, self.groups)]
        norm = torch.stack(sums).sum().sqrt()
        # ``skip`` (a bool device scalar the trainer sets, e.g. for a loss spike) skips the step as a non-finite norm does.
        update_norm = norm if self.skip is None else torch.where(self.skip, torch.full_like(norm, float("nan")), norm)
        self.step_count += torch.isfinite(update_norm).float()  # a skipped step is not counted, as in fused AdamW
        scalars = step_scalars(update_norm, self.step_count, group["lr"], group["betas"], group["weight_decay"], self.max_norm,
                               self.ema_decay)
        for i, g in enumerate(self.groups):
            state = (g.master, g.exp_avg, g.exp_avg_sq, g.ema, g.weights, scalars, *group["betas"], group["eps"])
            if kernels:
                master_kernels.adamw_ema_triton(tables[i][0], grads[i][0].dtype, g.layout, *state)
            else:
                master_kernels.adamw_ema_reference(grads[i], g.layout, *state)
        return norm

    def _flat_views(self, field: str) -> dict[int, torch.Tensor]:
        """id(parameter) -> its slice of each group's ``field`` buffer."""
        return {id(p): v for g in self.groups for p, v in zip(g.params, g.views(getattr(g, field)))}

    def master_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict (on the CPU) with the float32 master weights in place of the bf16 ones
        (under every name of a parameter shared by two modules)."""
        master = {id(p): v for g in self.groups for p, v in zip(g.params, g.masters())}
        by_name = {n: master[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in master}
        return {k: by_name.get(k, v).detach().cpu() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict:
        """torch.optim.AdamW's layout (per parameter: step, exp_avg, exp_avg_sq), views of the flat buffers."""
        m, v = self._flat_views("exp_avg"), self._flat_views("exp_avg_sq")
        group = {k: val for k, val in self.param_groups[0].items() if k != "params"}
        state = {i: {"step": self.step_count.clone(), "exp_avg": m[id(p)], "exp_avg_sq": v[id(p)]}
                 for i, p in enumerate(self.order)} if self.step_count.item() > 0 else {}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.order)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """From this class's or torch AdamW's state dict (one group, the same parameters); an empty
        state (saved before the first step) means zero moments and step 0."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.order):
            raise ValueError(f"optimizer state: expected one group of {len(self.order)} parameters, got "
                             f"{[len(g['params']) for g in groups]}")
        for g in self.groups:
            g.exp_avg.zero_()
            g.exp_avg_sq.zero_()
        m, v = self._flat_views("exp_avg"), self._flat_views("exp_avg_sq")
        state = state_dict["state"]
        pairs = list(zip(groups[0]["params"], self.order)) if state else []
        steps = set()
        for i, p in pairs:
            saved = state.get(i)
            if saved is None:
                raise ValueError(f"optimizer state: no state for parameter {i}")
            for key, flat in (("exp_avg", m), ("exp_avg_sq", v)):
                if saved[key].shape != p.shape:
                    raise ValueError(f"optimizer state: parameter {i}'s {key} has shape {tuple(saved[key].shape)}, "
                                     f"the model's {tuple(p.shape)}")
                flat[id(p)].copy_(saved[key])
            steps.add(float(saved["step"]))
        if len(steps) > 1:
            raise ValueError(f"optimizer state: the parameters' step counts differ ({sorted(steps)})")
        self.step_count.fill_(steps.pop() if steps else 0.0)
        self.param_groups[0].update({k: val for k, val in groups[0].items() if k != "params"})
