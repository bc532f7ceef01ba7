"""The training loop every stage uses: a model wrapped by a DeepSpeed engine, batches from a
ShardLoader, EMA, metrics, hooks, checkpoints and exact resume.

    trainer = Trainer(cfg, out_dir, model_fn=lambda: build_uvit(...), loss_fn=my_loss, seed=0)
    trainer.fit(loader)            # resumes from out_dir/checkpoints when there is one

`loss_fn(trainer, batch)` returns the loss of one micro-batch (call `trainer.engine(...)` for the
forward pass). Resume is exact: model, optimizer, scheduler, EMA, the step, every RNG and the
position in the data stream come back, so a resumed fp32 run repeats the uninterrupted losses.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dpt_scale import preemption
from dpt_scale.distributed import init_distributed
from dpt_scale.engine import trackers
from dpt_scale.engine.checkpoint import Checkpoints, rank_file, tag_of
from dpt_scale.engine.dsconfig import deepspeed_config
from dpt_scale.engine.ema import ShardedEMA
from dpt_scale.engine.export import export_weights
from dpt_scale.engine.metrics import Metrics
from dpt_scale.recipe.schema import Train

log = logging.getLogger(__name__)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU


class Trainer:
    def __init__(self, cfg: Train, out: str | Path, model_fn: Callable[[], torch.nn.Module],
                 loss_fn: Callable[["Trainer", dict], torch.Tensor], seed: int = 0,
                 export_extra: dict | None = None, hooks: Iterable[Callable[["Trainer", int], None]] = (),
                 hook_every: int | None = None, recipe=None, stage: str = "train",
                 init: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None):
        """`hooks` run every `hook_every` steps (default cfg.sample_every; 0: never) on every rank.
        `recipe` (its `logging` section) and `stage` name the run to the experiment trackers.
        `init(model)` gives the weights a fresh run starts from (the trained weights and the EMA);
        it is not called when there is a checkpoint to resume from."""
        import deepspeed

        if recipe is not None:
            trackers.check(recipe)  # every rank, before any work: one fails, all do
        self.recipe, self.stage, self.metrics = recipe, stage, None
        self.cfg, self.out, self.loss_fn, self.hooks = cfg, Path(out), loss_fn, list(hooks)
        self.hook_every = cfg.sample_every if hook_every is None else hook_every
        self.export_extra = export_extra or {}
        self.rank, self.world, self.device = init_distributed()
        self.checkpoints = Checkpoints(self.out / "checkpoints", cfg.keep_checkpoints)
        latest = self.checkpoints.latest()
        _seed(seed)  # the same on every rank: identical initial weights
        model = model_fn()
        start = init(model) if init is not None and latest is None else None
        if init is not None and latest is not None and self.rank == 0:
            log.info("resuming from a checkpoint: the starting weights given (init) are not read")
        if start is not None:
            model.load_state_dict(start)
        config = deepspeed_config(cfg, self.world)
        self.accum = config["gradient_accumulation_steps"]
        self.global_batch = config["train_batch_size"]
        self.engine, *_ = deepspeed.initialize(model=model, config=config,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.dtype = next(self.engine.module.parameters()).dtype
        self.flops_per_image = getattr(model, "flops_per_image", lambda: None)()
        _seed(seed + 7919 * (self.rank + 1))  # each rank draws its own noise from here on
        self.ema = ShardedEMA(self.engine.module, cfg.ema_decay, cfg.ema_warmup)
        if start is not None and self.dtype != torch.float32:
            _set_master_weights(self.engine.module, start, self.ema)
        self.step, self.position = 0, (0, 0)  # position: (epoch, samples of it this rank has used)
        self.stop = preemption.StopCheck(self.device)
        self._resume(latest)

    def _resume(self, step: int | None) -> None:
        if step is None:
            return
        state = self.checkpoints.load(self.engine, step)
        ema = state["ema"] if state["ema"] is not None else torch.load(  # whole EMA: kept by rank 0 only
            rank_file(self.checkpoints.root, step, 0), weights_only=False)["ema"]
        self.ema.load_state_dict(ema)
        _set_rng(state["rng"])
        self.step, self.position = step, tuple(state["position"])
        if self.rank == 0:
            log.info(f"resumed from {self.checkpoints.root / tag_of(step)} "
                     f"(epoch {self.position[0]}, {self.position[1]} samples into it on each rank)")

    def fit(self, loader) -> Path:
        """Train to cfg.steps; returns the exported weights file."""
        cfg = self.cfg
        metrics = self.metrics = Metrics(self.out, cfg.steps, self.step, enabled=self.rank == 0, recipe=self.recipe,
                                         stage=self.stage)
        batches = loader.batches(*self.position)
        tick, ticked = time.perf_counter(), self.step
        # preemption: a signal now waits for the end of the step (see dpt_scale/preemption.py)
        with preemption.stop_points(), metrics, closing(batches):
            while self.step < cfg.steps:
                loss = torch.zeros((), device=self.device)
                for _ in range(self.accum):
                    batch = next(batches)
                    micro = self.loss_fn(self, batch)
                    self.engine.backward(micro)
                    self.engine.step()
                    loss += micro.detach().float() / self.accum
                    self.position = (batch["epoch"], (batch["index"] + 1) * loader.batch_size)
                self.step += 1
                self.ema.update(self.step)
                metrics.advance()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dist.all_reduce(loss)
                    elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                    images_per_s = self.global_batch * (self.step - ticked) / elapsed
                    ticked = self.step
                    metrics.log(self.step, loss=loss.item() / self.world, lr=self.engine.get_lr()[0],
                                images_per_s=images_per_s, **self._mfu(images_per_s))
                paused = False
                if self.hook_every and self.step % self.hook_every == 0:
                    rng = _get_rng()  # hooks must not change the noise training draws next
                    for hook in self.hooks:
                        hook(self, self.step)
                    _set_rng(rng)
                    paused = True
                saved = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                if saved:
                    self.save()
                    paused = True
                if self.step < cfg.steps and self.stop.requested():  # every rank agrees
                    if not saved:
                        self.save()
                    raise preemption.Preempted(f"stopped at step {self.step} and saved it, to be requeued")
                if paused:  # images/s measures training, not sampling or saving
                    tick, ticked = time.perf_counter(), self.step
        weights = self.out / "weights.pt"
        if self.rank == 0:
            export_weights(self.checkpoints.root, self.step, weights, self.export_extra)
        dist.barrier()
        return weights

    def save(self) -> None:
        ema = self.ema.state_dict() if self.ema.partitioned or self.rank == 0 else None
        if self.metrics is not None:  # the trackers' files hold every step up to a checkpoint before it counts
            self.metrics.flush()
        self.checkpoints.save(self.engine, self.step, {"ema": ema, "rng": _get_rng(), "position": self.position})

    def _mfu(self, images_per_s: float) -> dict:
        if self.flops_per_image is None or self.device.type != "cuda":
            return {}
        name = torch.cuda.get_device_name(self.device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        # training = forward + backward = 3 forward passes (a recomputed forward does not count)
        return {"mfu": 3 * self.flops_per_image * images_per_s / self.world / peak} if peak else {}


def _set_master_weights(module: torch.nn.Module, start: dict[str, torch.Tensor], ema: ShardedEMA) -> None:
    """In bf16/fp16 DeepSpeed fills its fp32 master weights from the module's rounded low-precision
    ones, and our EMA starts from those too; under ZeRO 1-3 both get the starting weights' own fp32
    values instead. ZeRO 0's optimizer wrappers expose no such mapping: there only the EMA does."""
    from deepspeed.utils import safe_set_full_fp32_param

    unmapped = 0
    for name, p in module.named_parameters():
        if p.requires_grad:
            if hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None:
                safe_set_full_fp32_param(p, start[name].float().to(p.device))
            else:
                unmapped += 1
    if unmapped:
        log.warning(f"{unmapped} parameters start training from their values rounded to {p.dtype} (ZeRO stage 0 "
                    "keeps no fp32 copy it lets us set); the EMA starts from the exact values; use ZeRO 1-3 for both")
    ema.start_from(start)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
