"""The training loop: one process or many (torchrun, DDP or FSDP), AdamW, warmup, clipping,
accumulation, EMA, bf16/fp16, non-finite steps skipped on the device, atomic checkpoints, exact
resume, TensorBoard and sample grids.  The hot path is ``train_step``."""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ditkit.checkpoints import load_weights_for_finetune, save_weights
from ditkit.checkpoints.training import list_checkpoints, load_checkpoint, newest_good_checkpoint, save_checkpoint
from ditkit.config import Config, ConfigError, save_config
from ditkit.data import build_dataset, loss_inputs, split_batch
from ditkit.data.facts import fit_to_data
from ditkit.data.sampler import ShardBatchSampler, step_seed
from ditkit.fast import TrainRun, describe, train_speed
from ditkit.fast.recipes import TORCH_DDP_BUCKET_MB, block_options
from ditkit.models.dit import build_model
from ditkit.models.grid import as_size
from ditkit.objectives import LOGGED_TERMS, build_objective
from ditkit.training.distributed import DistInfo, barrier, cleanup, mean_over_ranks, setup_distributed
from ditkit.training.ema import ema_decay_at, update_ema
from ditkit.training.loggers import open_loggers
from ditkit.training.profiling import StepProfiler
from ditkit.training.repa import repa_objective
from ditkit.training.safety import LossGuard, RunLock, StopSignals, any_rank, check_resume
from ditkit.utils.io import atomic_write_text, remove_stale_temps

log = logging.getLogger("ditkit.train")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps, a divergence); the last good checkpoint is kept.
    ``ditkit train`` exits with ``EXIT_STOPPED``."""


class TrainingPreempted(RuntimeError):
    """SIGTERM or SIGINT: the step in flight finished and every rank wrote its checkpoint; ``--resume``
    continues.  ``ditkit train`` exits with ``EXIT_PREEMPTED``."""


EXIT_STOPPED = 3  # the run stopped itself (non-finite steps, divergence)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGINT; run again with --resume


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then constant (the DiT recipe)."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr


def train_step(model, objective, opt, micro_batches, step: int, shard0: int, cfg: Config, amp_dtype, scaler,
               device: torch.device, params: list[torch.Tensor], guard: LossGuard | None = None,
               info: DistInfo | None = None,
               terms: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches.  Returns (mean loss, grad norm, bad)
    as device tensors; nothing here waits for the device.  A non-finite gradient, or a loss that
    ``guard`` calls a spike (the loss averaged over the ranks, so that every rank decides alike),
    makes the optimizer skip the update on the device (``found_inf``), as a GradScaler would.
    ``bad`` marks a skipped step; with fp16's scaler an overflow is routine (the scale drops) and
    only a non-finite loss or a spike counts (a spike is flagged there, not skipped).  ``terms``, if
    given, receives the means of the loss terms the options add (``LOGGED_TERMS``), for the log."""
    accum = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    for m, batch in enumerate(micro_batches):
        torch.manual_seed(step_seed(cfg.train.seed, step, shard0 + m))  # noise, t, label drop of this shard
        x0, model_kwargs = split_batch(batch, device)
        last = m == accum - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last micro-batch
            model.set_requires_gradient_sync(last)
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()  # DDP
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = objective.loss(model, x0, model_kwargs, **loss_inputs(batch, device))
                loss = out["loss"].mean() / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
        for k in LOGGED_TERMS if terms is not None else ():
            if k in out:
                terms[k] = terms.get(k, 0) + out[k].detach().mean() / accum
    spike = torch.zeros((), dtype=torch.bool, device=device)
    if guard is not None:
        checked = loss_sum.clone()
        if info is not None and info.enabled:
            import torch.distributed as dist

            dist.all_reduce(checked, op=dist.ReduceOp.AVG)
        spike = guard.spike(checked)
    if getattr(opt, "updates_ema", False):  # norm, clip, skip, AdamW and EMA in the optimizer's step
        opt.skip = spike
        grad_norm = opt.step()
        opt.zero_grad(set_to_none=True)
        bad = ~torch.isfinite(grad_norm) | spike
        if guard is not None:
            guard.update(checked, ~bad)
        return loss_sum, grad_norm, bad
    if scaler is not None:
        scaler.unscale_(opt)
    grad_norm = gradient_norm(params, cfg.train.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor -> a plain tensor
        grad_norm = grad_norm.full_tensor()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
        bad = ~torch.isfinite(loss_sum) | spike
    else:
        bad = ~torch.isfinite(grad_norm) | spike
        opt.found_inf = bad.float()
        opt.step()
    opt.zero_grad(set_to_none=True)
    if guard is not None:
        guard.update(checked, ~bad)
    return loss_sum, grad_norm, bad


def gradient_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """The global L2 norm of the gradients, clipping them to ``clip`` when ``clip`` > 0.  Without
    clipping, only the norm: clip_grad_norm_(max_norm=inf) would also multiply every gradient by
    1.0, a read and a write of all of them (~2 ms per step for DiT-XL/2 on an H100)."""
    if clip > 0 or not hasattr(torch.nn.utils, "get_total_norm"):  # get_total_norm: torch >= 2.6
        return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


def _make_optimizer(model: nn.Module, ema: nn.Module, cfg: Config, plan) -> torch.optim.Optimizer:
    """The recipe's optimizer (bf16 master weights) or torch's fused AdamW."""
    kwargs = {"lr": cfg.train.lr, "betas": tuple(cfg.train.adam_betas), "weight_decay": cfg.train.weight_decay}
    opt = plan.optimizer(model, ema, max_norm=cfg.train.grad_clip, **kwargs)
    return opt if opt is not None else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kwargs,
                                                        fused=True)


def _parallel(cfg: Config, info: DistInfo) -> str:
    """The model's wrapper: none | ddp | fsdp (``TrainRun.parallel``; torchrun wraps even one process)."""
    return cfg.train.distributed if info.enabled else "none"


def _wrap_distributed(model: nn.Module, cfg: Config, info: DistInfo, ema: bool = False, bf16_gather: bool = False,
                      comm_hook=None, bucket_mb: float | None = None) -> nn.Module:
    """DDP for the trained model (``comm_hook``: its gradient all-reduce, and ``bucket_mb``: its bucket size, from
    the speed plan; default ``train.ddp_bucket_mb``, else torch's 25 MiB); FSDP2
    (``fully_shard`` per block, then the root) shards the model and, identically, its EMA so that the EMA
    update is shard-by-shard.  ``bf16_gather`` (or ``train.fsdp_bf16_gather``): FSDP gathers bf16 weights."""
    parallel = _parallel(cfg, info)
    if parallel == "none" or (ema and parallel != "fsdp"):
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 gathering: the blocks' inputs (the residual stream) keep their dtype; gradients are reduced in float32.
        # Not for the EMA: the sample grids run it outside autocast, at full precision.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
            if (cfg.train.fsdp_bf16_gather or bf16_gather) and not ema else MixedPrecisionPolicy()
        for block in model.blocks:  # without resharding, the backward reuses the forward's gathered weights
            fully_shard(block, reshard_after_forward=cfg.train.fsdp_reshard or ema, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
              bucket_cap_mb=bucket_mb or cfg.train.ddp_bucket_mb or TORCH_DDP_BUCKET_MB, gradient_as_bucket_view=True)
    if comm_hook is not None:
        ddp.register_comm_hook(None, comm_hook)
    return ddp


def _full_state_dict(model: nn.Module, cfg: Config, info: DistInfo) -> dict:
    """The unsharded state dict (gathered on every rank for FSDP, used on rank 0)."""
    if _parallel(cfg, info) == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _optimizer_state(model: nn.Module, opt, cfg: Config, info: DistInfo) -> dict:
    if _parallel(cfg, info) == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def _load_optimizer_state(model: nn.Module, opt, state: dict, cfg: Config, info: DistInfo) -> None:
    if _parallel(cfg, info) == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, _keyed_by_name(state, model), options=StateDictOptions(full_state_dict=True))
    else:
        impl = [{k: g[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in g} for g in opt.param_groups]
        opt.load_state_dict(state)
        for group, flags in zip(opt.param_groups, impl):  # the saved run may have used the other optimizer
            group.update(flags)


def _keyed_by_name(state: dict, model: nn.Module) -> dict:
    """A plain optimizer's state numbers the parameters in the order of ``model.parameters()``; FSDP's
    loader finds them by name, as its own full state dict keys them (a 1-process checkpoint resumed under FSDP)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def key(k):
        return names[k] if isinstance(k, int) else k

    return {"state": {key(k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key(k) for k in g["params"]]} for g in state["param_groups"]]}


def _truncate_metrics(path: Path, step: int) -> None:
    """After a crash the log may run past the checkpoint; drop the lines the resumed run redoes."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # a line torn by the crash
                continue
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def train(cfg: Config, run_dir: str | Path, resume: bool = False, device: str | None = None,
          init_from: str | None = None, speed=None, resume_from: str | Path | None = None,
          allow_changes: bool = False) -> dict:
    """Train ``cfg`` into ``run_dir`` (checkpoints/, config.yaml, metrics.jsonl, tb/, samples/).

    ``resume``: continue from the newest good checkpoint bit-for-bit as if never stopped (a corrupt or
    truncated newer one is named and skipped); ``resume_from``: from this checkpoint instead; a changed
    seed, global batch or data is refused unless ``allow_changes``.  ``init_from``: start from another
    checkpoint's weights (e.g. an official DiT one).  ``speed``: a ``ditkit.fast.TrainSpeed`` (levers, for
    ablations) instead of ``cfg.train.speed``.  One trainer per ``run_dir`` (a lock); SIGTERM or SIGINT end
    the run after a checkpoint with ``TrainingPreempted``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a folder")
    info = setup_distributed(device)
    try:
        with RunLock(run_dir, enabled=info.is_main), StopSignals() as stop:
            return _train(cfg, run_dir, info, stop, resume, init_from, speed, resume_from, allow_changes)
    finally:
        cleanup(info)


def _resume_state(ckpt_dir: Path, cfg: Config, resume: bool, resume_from, allow_changes: bool, init_from) -> dict | None:
    """The checkpoint to continue from (checked against ``cfg``), or None for a new run."""
    if resume_from is not None:
        path, state = Path(resume_from), load_checkpoint(resume_from)
        if not all(k in state for k in ("config", "model", "step")):
            raise ConfigError(f"{path} is not a ditkit training checkpoint (no config, model and step): use --init-from "
                              "to start from its weights")
    elif resume:
        found = newest_good_checkpoint(ckpt_dir, log.warning)
        if found is None:
            log.info(f"no checkpoint in {ckpt_dir}; starting a new run")
            return None
        path, state = found
    else:
        if list_checkpoints(ckpt_dir):
            raise ConfigError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run or choose "
                              "another --run-dir")
        return None
    check_resume(state["config"], cfg.to_dict(), path, allow_changes)
    log.info(f"resuming from {path} at step {int(state['step'])}")
    return state


def _keep_shards(cfg: Config, state: dict, info: DistInfo) -> Config:
    """``cfg`` for resuming ``state`` on ``info.world_size`` processes.  A step's global batch is cut into
    processes × accumulation shards, and each shard's random draws come from (seed, step, shard): the same number
    of shards gives the same micro-batches and draws, so the run goes on bit for bit.  With the accumulation the
    checkpoint's and another number of processes, the accumulation is changed to keep the shards (said in one
    line); where it cannot be (it was changed, or does not divide), the run goes on with other draws, and a
    warning says so."""
    shards = state.get("extra", {}).get("shards")
    accum, world = cfg.train.grad_accum, info.world_size
    if not shards or shards == world * accum:
        return cfg
    saved_accum = state["config"].get("train", {}).get("grad_accum", accum)
    if accum == saved_accum and shards % world == 0:
        cfg = copy.deepcopy(cfg)
        cfg.train.grad_accum = shards // world
        log.info(f"train.grad_accum = {cfg.train.grad_accum} (the checkpoint's {shards} shards per step over "
                 f"{_processes(world)}: the same micro-batches and random draws)")
        return cfg
    keep = f"; train.grad_accum={shards // world} would keep them" if shards % world == 0 else ""
    log.warning(f"resuming as {_processes(world)} × {accum} accumulation = {world * accum} shards "
                f"per step, where the checkpoint had {shards}: the global batch is the same, but its random draws are "
                f"split otherwise, so the run goes on statistically alike, not bit for bit{keep}")
    return cfg


def _train(cfg: Config, run_dir: Path, info: DistInfo, stop: StopSignals, resume: bool, init_from, speed, resume_from,
           allow_changes: bool) -> dict:
    dev = info.device
    ckpt_dir = run_dir / "checkpoints"
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(message)s")
    if info.is_main and ckpt_dir.is_dir():
        for tmp in remove_stale_temps(ckpt_dir):
            log.info(f"removed {tmp}, left by an interrupted checkpoint write")

    cfg, fitted = fit_to_data(cfg)  # what the data fixes, before anything is built (ditkit.data.facts)
    if info.is_main:
        for line in fitted:
            log.info(line)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, **cfg.model.kwargs()).to(dev)
    num_params = sum(p.numel() for p in model.parameters())  # before a speed lever changes the modules
    objective = build_objective(cfg)
    train_objective = objective
    if cfg.model.repa_depth is not None:  # the step's loss adds REPA's term; sampling keeps the plain objective
        train_objective, note = repa_objective(cfg, objective, model.grid_size, dev)
        if info.is_main:
            log.info(note)
    state = _resume_state(ckpt_dir, cfg, resume, resume_from, allow_changes, init_from)
    start_step, extra = 0, {}
    if state is not None:
        cfg = _keep_shards(cfg, state, info)
        model.load_state_dict(state["model"])
        start_step = int(state["step"])
        extra = state.get("extra", {})
    elif init_from:
        load_weights_for_finetune(model, init_from, log)

    ema = copy.deepcopy(model).requires_grad_(False)
    if state is not None:
        ema.load_state_dict(state["ema"])
    amp_dtype = autocast_dtype(cfg.train.precision, dev)
    if cfg.train.fsdp_bf16_gather and amp_dtype != torch.bfloat16:
        raise ConfigError("train.fsdp_bf16_gather=true needs bf16 autocast: train.precision=bf16 (or auto on a GPU)")
    # The one door for speed, after the EMA copy: the EMA (and everything sampling from it) keeps the plain modules.
    try:
        plan = train_speed(speed if speed is not None else cfg.train.speed, TrainRun(
            dev, amp_dtype, info.world_size, cfg.train.grad_accum, _parallel(cfg, info),
            cross_attention=bool(cfg.model.cond_channels and cfg.model.field_mode == "cross_attention")
            or cfg.model.cond_mode == "cross_attention" or cfg.model.context_dim > 0,
            activation_checkpointing=cfg.train.activation_checkpointing, block=block_options(model),
            masked=cfg.data.kind == "sequences"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for note in plan.notes:
        log.info(note)
    applied = plan.apply(model)
    speed_line = f"speed: {describe(plan.speed)}" + (f" ({'; '.join(applied)})" if applied else "")
    model.train()
    ema.eval()
    fsdp = plan.run.parallel == "fsdp"
    if not fsdp:  # bf16 master weights re-seat the parameters: before DDP builds its buckets from them
        opt = _make_optimizer(model, ema, cfg, plan)
    bucket_mb, said = plan.ddp_bucket_mb(model, cfg.train.ddp_bucket_mb)
    if said:
        log.info(said)
    train_model = _wrap_distributed(model, cfg, info, bf16_gather=plan.bf16_gather, comm_hook=plan.ddp_comm_hook(),
                                    bucket_mb=bucket_mb)
    _wrap_distributed(ema, cfg, info, ema=True)
    if fsdp:  # FSDP2 turns the parameters into shards (DTensors): the optimizer holds those
        opt = _make_optimizer(train_model, ema, cfg, plan)
    params = [p for p in train_model.parameters() if p.requires_grad]
    ema_in_step = getattr(opt, "updates_ema", False)
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype == torch.float16 else None
    if state is not None:
        _load_optimizer_state(train_model, opt, state["opt"], cfg, info)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    graphs = plan.cuda_graphs
    step_model, loss_objective = plan.compile(train_model, train_objective)

    dataset = build_dataset(cfg)
    sampler = ShardBatchSampler(len(dataset), cfg.train.global_batch_size, info.rank, info.world_size,
                                cfg.train.grad_accum, cfg.train.seed, start_step,
                                getattr(dataset.inner, "lengths", None), cfg.data.length_buckets)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=getattr(dataset.inner, "collate", None),  # sequences: pad and mask
                        pin_memory=dev.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    batches = iter(loader)
    if info.is_main:
        log.info(_summary(cfg, dataset, model, num_params, info.world_size, sampler.micro, start_step, speed_line,
                          _parallel(cfg, info)))
        embed = model.x_embedder.proj.weight  # (hidden, C, *patch): a token's width and its patch's values
        width, values = embed.shape[0], math.prod(embed.shape[1:])
        if width < values:
            log.warning(f"model.hidden_size={width} is narrower than one patch's {values} values "
                        f"({embed.shape[1]} channels × patch {'×'.join(map(str, embed.shape[2:]))}): each token "
                        "cannot carry its patch, and samples come out far off the data's scale; raise model.hidden_size "
                        "or lower model.patch_size")

    writer = None
    metrics_path = run_dir / "metrics.jsonl"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _truncate_metrics(metrics_path, start_step)
        writer = open_loggers(cfg.train.log_to, run_dir, cfg.to_dict())
    # Every rank samples the grid: a sharded (FSDP) EMA needs all of them for a forward pass.
    fixed = _fixed_sampling_inputs(cfg, dataset, dev) if cfg.train.sample_every and cfg.data.kind != "sequences" else None
    if cfg.train.sample_every and cfg.data.kind == "sequences" and info.is_main:
        log.info("sample grids: none for sequences (ditkit.generation.sample_sequences samples a checkpoint)")
    grid_vae = None
    if fixed is not None and cfg.data.kind == "latents" and cfg.train.vae and info.is_main:
        from ditkit.models.vae import load_vae

        grid_vae = load_vae(cfg.train.vae, device=dev)

    end_step = cfg.train.steps
    guard = LossGuard(cfg.train.spike_factor, dev)
    if "loss_guard" in extra:
        guard.load_state_dict(extra["loss_guard"])
    consecutive_bad = torch.zeros((), device=dev)
    bad_since_ckpt = torch.zeros((), device=dev)
    ckpts = {"last": None, "keep": None}  # the newest checkpoint written; the one kept from before a divergence
    worst_run = torch.zeros((), device=dev)
    bad_acc = torch.zeros((), device=dev)
    nonfinite_total = int(extra.get("nonfinite_total", 0))
    loss_acc = torch.zeros((), device=dev)
    norm_acc = torch.zeros((), device=dev)
    term_acc: dict[str, torch.Tensor] = {}  # the options' loss terms (LOGGED_TERMS), summed over good steps
    n_acc, t_last = 0, time.perf_counter()
    t_start = t_last
    trained_before = float(extra.get("train_seconds", 0.0))  # the training time of the runs this one resumes

    def trained() -> float:
        """Seconds of training over every resume: set-up before the loop is not counted, compilation is."""
        return trained_before + time.perf_counter() - t_start

    budget = 60 * cfg.train.budget_minutes
    if budget and trained_before >= budget and start_step < end_step:
        log.info(f"train.budget_minutes={cfg.train.budget_minutes:g} already spent by step {start_step} "
                 f"({trained_before / 60:.1f} min trained): nothing to do; raise it to train on")
        end_step = start_step
    bar = tqdm(total=end_step, initial=start_step, desc="train", disable=not info.is_main, dynamic_ncols=True)

    def checkpoint(step: int) -> bool:
        """Written only from a good state: after a bad step (non-finite or a spike) the weights may be
        on their way to diverging, so the newest good checkpoint stays the newest.  A checkpoint older
        than a detected divergence is never pruned by keep_last."""
        if consecutive_bad.item() > 0:  # the same on every rank: 'bad' follows all-reduced quantities
            log.warning(f"step {step}: not checkpointing: the last {int(consecutive_bad.item())} step(s) were bad "
                        f"(non-finite, or a loss spike); the newest good checkpoint stays {ckpts['last']}")
            return False
        if bad_since_ckpt.item() > 0 and ckpts["last"] is not None:
            ckpts["keep"] = ckpts["last"]
        bad_since_ckpt.zero_()
        ema_sd = _full_state_dict(ema, cfg, info)
        model_sd = opt.master_state_dict(model) if hasattr(opt, "master_state_dict") else _full_state_dict(model, cfg, info)
        st = {"model": model_sd, "ema": ema_sd, "opt": _optimizer_state(train_model, opt, cfg, info),
              "step": step, "config": cfg.to_dict(),
              "extra": {"nonfinite_total": nonfinite_total, "loss_guard": guard.state_dict(), "train_seconds": trained(),
                        "shards": info.world_size * cfg.train.grad_accum}}
        normalizer = getattr(dataset.inner, "normalizer", None)  # fields: samples go back to physical units
        if normalizer is not None:
            st["normalizer"] = normalizer.state_dict()
        if scaler is not None:
            st["scaler"] = scaler.state_dict()
        if info.is_main:
            ckpts["last"] = save_checkpoint(st, ckpt_dir, step, cfg.train.keep_last, cfg.train.ckpt_format,
                                            keep=ckpts["keep"])
            if step == end_step:
                save_weights(ema_sd, model, cfg, run_dir / "ema.safetensors")
        barrier(info)
        return True

    profiler = StepProfiler(cfg.train.profile, run_dir, info.is_main, dev, start_step, end_step)
    step = start_step
    try:
        for step in range(start_step, end_step):
            profiler.before(step)
            if graphs:  # a new iteration: the CUDA graphs may reuse the memory of the last step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.train.lr, cfg.train.warmup_steps)
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            decay = ema_decay_at(cfg.train.ema_decay, step, cfg.train.ema_warmup)
            if ema_in_step:
                opt.ema_decay = decay
            step_terms = {}
            loss, grad_norm, bad = train_step(step_model, loss_objective, opt, micro, step, info.rank * cfg.train.grad_accum,
                                              cfg, amp_dtype, scaler, dev, params, guard=guard, info=info, terms=step_terms)
            for k, v in step_terms.items():
                term_acc[k] = term_acc.get(k, 0) + torch.where(bad, torch.zeros_like(v), v)
            if not ema_in_step:
                update_ema(ema, model, decay)
            finite_norm = torch.isfinite(grad_norm)
            consecutive_bad = torch.where(bad, consecutive_bad + 1, torch.zeros_like(consecutive_bad))
            worst_run = torch.maximum(worst_run, consecutive_bad)
            loss_acc += torch.where(bad, torch.zeros_like(loss), loss)
            norm_acc += torch.where(bad | ~finite_norm, torch.zeros_like(grad_norm), grad_norm)
            bad_acc += bad.float()
            bad_since_ckpt += bad.float()
            n_acc += 1
            bar.update(1)
            done = step + 1
            profiler.after(done)
            time_up = False
            if done % cfg.train.log_every == 0 or done == end_step:
                # The one host read per logging interval.  'bad' follows the all-reduced gradient norm
                # (or, with a scaler, the loss, which is then averaged like the loss itself).
                over_time = (cfg.train.max_minutes > 0 and time.perf_counter() - t_start > 60 * cfg.train.max_minutes
                             or budget > 0 and trained() > budget)
                names = sorted(term_acc)
                flags = torch.stack([loss_acc, norm_acc, bad_acc, worst_run, torch.full_like(loss_acc, float(over_time)),
                                     *(term_acc[k] for k in names)])
                stats = mean_over_ranks(flags, info).tolist()  # every rank stops when any rank's clock runs out
                n_bad, worst = int(round(stats[2])), int(round(stats[3]))
                good = n_acc - n_bad
                elapsed = time.perf_counter() - t_last
                # A skipped step has no loss to average: an interval of bad steps only logs null, never 0.0.
                record = {"step": done, "loss": stats[0] / good if good else None,
                          "grad_norm": stats[1] / good if good else None,
                          "lr": opt.param_groups[0]["lr"], "img_per_s": n_acc * cfg.train.global_batch_size / elapsed,
                          "train_minutes": trained() / 60}
                record.update({k: stats[5 + i] / good if good else None for i, k in enumerate(names)})
                if n_bad:
                    record["bad_steps"] = n_bad
                if dev.type == "cuda":
                    record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                if hasattr(dataset.inner, "num_unreadable"):  # image folders: skipped files, each named in a warning
                    record["unreadable_images"] = dataset.inner.num_unreadable
                if n_bad:
                    nonfinite_total += n_bad
                    log.warning(f"step {done}: {n_bad} bad step(s) skipped (a non-finite loss or gradient, or a loss over "
                                f"{cfg.train.spike_factor:g}× its running mean; {nonfinite_total} in all)")
                if info.is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        writer.scalars({k: v for k, v in record.items() if k != "step"}, done)
                    if record["loss"] is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if worst >= cfg.train.max_nonfinite:
                    bar.close()
                    newest = ckpts["keep"] or ckpts["last"] or (list_checkpoints(ckpt_dir) or [None])[-1]
                    raise TrainingStopped(f"the run diverged: {worst} consecutive bad steps (non-finite, or losses over "
                                          f"{cfg.train.spike_factor:g}× their running mean) by step {done}; the newest good "
                                          f"checkpoint is {newest}: lower train.lr or raise train.grad_clip, then --resume")
                for acc in (loss_acc, norm_acc, bad_acc, worst_run):
                    acc.zero_()
                term_acc.clear()
                n_acc, t_last = 0, time.perf_counter()
                time_up = stats[4] > 0 and done < end_step
                if time_up:
                    end_step = done  # the end of this run: final checkpoint, EMA weights; --resume goes on to train.steps
                    limit = (f"train.budget_minutes={cfg.train.budget_minutes:g} ({trained() / 60:.1f} min trained over "
                             f"every resume)" if budget > 0 and trained() > budget else
                             f"train.max_minutes={cfg.train.max_minutes:g}")
                    log.info(f"{limit} reached at step {done}: checkpointing and stopping")
            # Stop signals: one process reads its own flag; several agree every few steps (a host sync).
            stopping = stop.requested if not info.enabled else (
                done % min(cfg.train.log_every, 10) == 0 and any_rank(stop.requested, info))
            written = (done % cfg.train.ckpt_every == 0 or done == end_step or stopping) and checkpoint(done)
            if stopping:
                bar.close()
                where = f"checkpointed at step {done}" if written else f"the newest good checkpoint is {ckpts['last']}"
                raise TrainingPreempted(f"stopped by a signal at step {done}, {where} in {ckpt_dir}: run the same "
                                        "command with --resume to continue")
            if fixed is not None and (done % cfg.train.sample_every == 0 or done == end_step):  # the last step too
                _write_sample_grid(ema, objective, cfg, fixed, run_dir / "samples" / f"step_{done:08d}.png", writer, done,
                                   info.is_main, grid_vae)
            if time_up:
                break
    finally:  # an exception inside the window must not leave the profiler running
        profiler.close()
    bar.close()
    if writer is not None:
        writer.close()
    return {"step": end_step if end_step > start_step else start_step, "run_dir": str(run_dir)}


BLOCK_LABELS = {"rope": "RoPE", "rmsnorm": "RMSNorm", "qk_norm": "QK-norm", "swiglu": "SwiGLU"}  # the keys of block_options


def _processes(n: int) -> str:
    return f"{n} process{'es' if n > 1 else ''}"


def _summary(cfg: Config, dataset, model: nn.Module, num_params: int, world_size: int, micro: int, start_step: int,
             speed_line: str, parallel: str = "none") -> str:
    """The start-up block: what the run found and what it will do."""
    d, inner = cfg.data, dataset.inner
    classes = len(getattr(inner, "classes", None) or []) or getattr(inner, "num_classes", None)
    data = f"data: {d.kind} {d.path or '(built in)'}, {len(dataset)} samples"
    if cfg.model.num_classes > 0 and classes:
        data += f", {classes} classes"
    sizes = set(getattr(inner, "sizes", None) or [])
    if len(sizes) > 1:  # samples of different sizes (SequenceDataset): the channels and the largest extent per axis
        largest = "×".join(str(max(s[a] for s in sizes)) for a in range(len(next(iter(sizes)))))
        data += f", x ({inner.channels}, up to {largest})"
    else:
        with torch.random.fork_rng(devices=[]):  # reading an item seeds the global generator
            data += f", x {tuple(dataset[(0, 0)]['x'].shape)}"
    grid = model.grid
    size, p = "×".join(map(str, grid.size)), model.patch_size
    patch = p if isinstance(p, int) else "×".join(map(str, p))
    processes = _processes(world_size) + (f" ({parallel.upper()})" if parallel != "none" else "")
    global_batch = world_size * micro * cfg.train.grad_accum
    m, o, t = cfg.model, cfg.objective, cfg.train
    options = block_options(model)
    block = [label for key, label in BLOCK_LABELS.items() if key in options]
    if m.repa_depth:
        block.append(f"REPA after block {m.repa_depth}")
    recipe = [f"{o.time_sampling} times" + (f" ({o.logit_mean:g}, {o.logit_std:g})" if o.time_sampling == "logit_normal"
                                             else "")]
    recipe += [f"shift {o.shift:g}"] * (o.shift != 1) + [f"direction loss {o.cos_weight:g}"] * (o.cos_weight > 0)
    recipe += [f"REPA λ {o.repa_weight:g}"] * bool(m.repa_depth)
    return "\n".join([
        data,
        f"model: {m.name}, {num_params / 1e6:.2f}M parameters, {grid.num_tokens} tokens per sample "
        f"({size} / patch {patch})" + (f"; {', '.join(block)}" if block else ""),
        f"objective: {o.name}, {', '.join(recipe)}; sampler {cfg.sample.sampler}, {cfg.sample.steps} steps; "
        f"AdamW lr {t.lr:g}, betas ({t.adam_betas[0]:g}, {t.adam_betas[1]:g}), weight decay {t.weight_decay:g}",
        f"batch: {global_batch} global = {processes} × {micro} micro-batch × {t.grad_accum} accumulation; "
        f"steps {start_step} → {t.steps}",
        speed_line,
    ])


def _fixed_sampling_inputs(cfg: Config, dataset, dev: torch.device) -> dict:
    """The same noise and conditioning at every sample grid, so grids show progress, not luck:
    labels row by row, and the params / fields / embedding sequences of the first training samples."""
    from ditkit.sampling import grid_labels

    g = torch.Generator().manual_seed(cfg.train.seed + 12345)
    labels = grid_labels(cfg.model.num_classes, per_class=8 if cfg.model.num_classes <= 16 else 1, max_total=64)
    shape = (len(labels), cfg.model.in_channels, *as_size(cfg.model.input_size))
    kwargs = {"y": labels.to(dev)} if cfg.model.num_classes > 0 else {}
    items = [dataset[(0, i % len(dataset))] for i in range(len(labels))]
    for key in ("params", "field"):
        if key in items[0]:
            kwargs[key] = torch.stack([it[key] for it in items]).to(dev)
    if "context" in items[0]:
        from ditkit.data.context import pad_contexts

        context, mask = pad_contexts([it["context"] for it in items])
        kwargs |= {"context": context.to(dev), "context_mask": mask.to(dev)}
    return {"noise": torch.randn(shape, generator=g).to(dev), "kwargs": kwargs}


def _write_sample_grid(ema, objective, cfg: Config, fixed: dict, path: Path, writer, step: int, is_main: bool,
                       vae=None) -> None:
    from ditkit.sampling import generate, save_sample_grid

    x, _ = generate(ema, objective, fixed["noise"], fixed["kwargs"], cfg.sample, progress=False)
    if hasattr(ema, "reshard"):  # FSDP2 leaves the root unsharded after a no-grad forward
        ema.reshard()
    if not is_main:
        return
    image = save_sample_grid(x, cfg, path, nrow=8, vae=vae)
    if writer is not None:
        writer.image("samples", image, step)
