"""Train the pruned network with its masks held exactly (SGD+momentum or AdamW), resumable, optionally DDP.

`train_module` is the loop itself and works on any nn.Module with a mapping of boolean masks keyed by parameter
name; `sparse_train` rebuilds the module from the normalized ONNX file, loads the masks and the data, and calls
it. Under torchrun (`--nproc N`: stages/sparse_train/worker.py launches it) each rank takes half, a third…
of every global batch, so with no BatchNorm and no augmentation the result equals one process's within float
rounding. BatchNorm under DDP: on CUDA the BatchNorms become SyncBatchNorm (statistics of the global batch, as one
process); on CPU torch's SyncBatchNorm refuses to run (it needs GPU tensors, torch 2.14), so each rank normalises
over its own share of the batch and keeps rank 0's running statistics. Augmentation draws per rank. Imports
pipeline and force_core only (no prefect, no click, no flows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from force_core import (
    CALIBRATION_BATCHES,
    MaskEnforcer,
    TrainNorm,
    add_train_norm,
    calibrate_train_norm,
    fold_train_norm,
    recalibrate_train_norm,
)
from force_core.losses import LOSSES
from force_core.train_norm import FeatureBatchNorm, silence_constant_channels
from pipeline.artifacts import RunFiles, atomic_path, write_json_atomic
from pipeline.config import CompressConfig, data_options
from pipeline.data import DataSplits, ImageSet, augmented, load_data, make_loader, mask_batches
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError, DataError, TrainingDivergedError
from pipeline.files import scoring_batch
from pipeline.geometry import Geometry
from pipeline.plotting import drawn_alone
from pipeline.progress import Progress, say
from stages.onnx_convert.mask_file import load_masks
from stages.onnx_convert.scoring import classifier_io
from stages.onnx_convert.to_torch import load_module

CHECKPOINT = RunFiles.CHECKPOINT
TRAINED = RunFiles.TRAINED
HISTORY = RunFiles.HISTORY
CURVE = RunFiles.CURVE
RECALIBRATION_BATCHES = CALIBRATION_BATCHES  # training batches the train-time norms' statistics are re-estimated on


@dataclass(frozen=True)
class TrainResult:
    """What sparse training produced. `state_path` (run_dir/trained.pt, the module's state_dict) is written only
    when all `epochs_target` epochs are done (`completed`); `val_acc` is torch top-1 on the held-out split."""

    state_path: Path
    history_path: Path
    checkpoint_path: Path
    epochs: int
    epochs_target: int
    completed: bool
    resumed_from_epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    images_per_s: float
    density: float
    device: str
    world_size: int
    seconds: float
    train_norm_layers: tuple[str, ...] = ()  # initializer names of the weights that trained with a BatchNorm

    def describe(self) -> str:
        norm = f", train-time BatchNorm on {len(self.train_norm_layers)} fused layer(s)" if self.train_norm_layers \
            else ""
        resumed = f" (resumed from epoch {self.resumed_from_epoch})" if self.resumed_from_epoch else ""
        world = f" on {self.world_size} processes" if self.world_size > 1 else ""
        return (f"{self.epochs} epoch(s){resumed}{world}, train acc {self.train_acc:.4f}, val acc {self.val_acc:.4f}, "
                f"{self.images_per_s:.0f} img/s{norm}")


# ------------------------------------------------------------------------------------------ masks held


def hold_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> MaskEnforcer:
    """force_core's MaskEnforcer over float 0/1 masks laid out like their weights (channels_last on CUDA), so the
    fused multiplies touch memory in the weights' own order."""
    params = dict(module.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise BadInputError(f"masks name parameters the model does not have: {', '.join(missing[:5])}")
    laid_out = {}
    for name, m in masks.items():
        p = params[name]
        if tuple(m.shape) != tuple(p.shape):
            raise BadInputError(f"mask for {name} has shape {tuple(m.shape)} but the weight has {tuple(p.shape)}")
        laid_out[name] = torch.empty_like(p, requires_grad=False).copy_(m.to(device=p.device, dtype=p.dtype))
    return MaskEnforcer(module, laid_out)


@torch.no_grad()
def _mask_grads_(enforcer: MaskEnforcer) -> None:
    """Zero the gradients of pruned entries (one fused multiply). With zero gradient and zero weight, SGD's
    momentum and weight decay and AdamW's moments and decoupled decay all stay exactly zero there, so the
    optimizer state is masked only once, when it is loaded."""
    pairs = [(p.grad, m) for p, m in zip(enforcer.params, enforcer.masks, strict=True) if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])


def _apply_(enforcer: MaskEnforcer) -> None:
    if enforcer.params:  # MaskEnforcer.apply_ refuses an empty mask set (a dense run)
        enforcer.apply_()


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               enforcer: MaskEnforcer | None = None,
               loss_fn: Callable[..., torch.Tensor] = F.cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step (bf16 autocast on CUDA); with `enforcer`, pruned entries get zero gradient and are
    exactly 0.0 after the step. Returns (loss, logits), not synchronised."""
    with _autocast(x.device):
        out = model(x)
        loss = loss_fn(out.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if enforcer is not None:
        _mask_grads_(enforcer)
    optimizer.step()
    if enforcer is not None:
        _apply_(enforcer)  # pruned weights back to exactly 0.0
    return loss, out


def _density(enforcer: MaskEnforcer) -> float:
    total = sum(m.numel() for m in enforcer.masks)
    return sum(int(torch.count_nonzero(m)) for m in enforcer.masks) / total if total else 1.0


class _SyncFeatureBatchNorm(nn.SyncBatchNorm):
    """FeatureBatchNorm (BatchNorm over a Linear's last dimension, any rank) with statistics of the global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def sync_batchnorm_(module: nn.Module) -> list[str]:
    """Replace every BatchNorm1d/2d/3d of `module` (and force_core's FeatureBatchNorm) with a SyncBatchNorm holding
    the same parameters and buffers (the same tensors), in place; returns the module paths replaced. The state_dict
    keys stay the same. Under DDP on CUDA the statistics are then those of the global batch; outside a process
    group SyncBatchNorm computes exactly what BatchNorm does. (nn.SyncBatchNorm.convert_sync_batchnorm would turn
    FeatureBatchNorm into a plain SyncBatchNorm, which normalises the wrong dimension of an (N, T, F) input.)"""
    swaps = []
    for path, child in module.named_modules():
        if isinstance(child, FeatureBatchNorm):
            swaps.append((path, child, _SyncFeatureBatchNorm))
        elif type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            swaps.append((path, child, nn.SyncBatchNorm))
    for path, bn, cls in swaps:
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            sync.weight, sync.bias = bn.weight, bn.bias
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
        sync.train(bn.training)
        parent, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent), name, sync)
    return [path for path, _, _ in swaps]


# ------------------------------------------------------------------------------------------ helpers


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(schedule: str, total_steps: int):
    """Per-iteration factor on the peak lr: cosine to 0, or step (x0.1 at 50% and again at 75%, FORCE.md's
    CIFAR recipe drops at 150 and 250 of 350 epochs, about 43% and 71%)."""
    total = max(1, total_steps)
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if schedule == "step":
        return lambda t: 0.1 ** ((t >= 0.5 * total) + (t >= 0.75 * total))
    raise BadInputError(f"unknown --lr-schedule {schedule!r}; use cosine or step")


def make_optimizer(module: nn.Module, config: CompressConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise BadInputError(f"unknown --optimizer {config.optimizer!r}; use sgd or adamw")


def _autocast(device: torch.device):
    # bf16 on CUDA; on CPU the same code runs in fp32 (autocast disabled).
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(module: nn.Module, dataset: ImageSet, *, batch_size: int | None = None,
             device: torch.device | str = "cpu",
             loss_fn: Callable[..., torch.Tensor] = F.cross_entropy) -> tuple[float, float]:
    """(mean loss, top-1 accuracy) of `module` on `dataset`, in eval mode; restores the module's mode."""
    device = torch.device(device)
    batch_size = batch_size or scoring_batch(dataset.shape)
    was_training = module.training
    module.eval()
    loss_sum, correct, n = 0.0, 0, 0
    loader = make_loader(dataset, batch_size, shuffle=False, pin_memory=device.type == "cuda")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            out = module(x)
        loss_sum += float(loss_fn(out.float(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    module.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


def _to_device(batches: list[torch.Tensor], device: torch.device):
    return (x.to(device, non_blocking=True) for x in batches)


def _finite_on_all_ranks(value: float, world: int, device: torch.device) -> bool:
    """Every rank scores the held-out split with its own BatchNorm statistics (CPU DDP): decide together, or one
    rank stops while the others wait for it at the checkpoint."""
    finite = torch.tensor(float(math.isfinite(value)), device=device)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def planned_epochs(epochs: int, max_steps: int | None, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs to run, optimizer steps in all): `epochs` whole epochs, or with `max_steps` as many epochs as those
    steps need (the last one partial)."""
    if max_steps is None:
        return epochs, epochs * steps_per_epoch
    return math.ceil(max_steps / max(steps_per_epoch, 1)), int(max_steps)


def _fingerprint(config: CompressConfig, world_size: int, splits: DataSplits) -> dict:
    """What must match for a checkpoint to be resumed (training recipe, data, world size)."""
    keys = ("epochs", "max_steps", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "seed",
            "data", "val_fraction", "augment", "image_size", "recipe")
    fp = {k: getattr(config, k) for k in keys}
    fp["image_size"] = list(fp["image_size"]) if fp["image_size"] else None
    fp.update(world_size=world_size, n_train=len(splits.train), n_val=len(splits.val),
              preprocessing=json.loads(json.dumps(preprocessing_of(splits))))
    return fp


@drawn_alone
def _plot_history(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # figures stay in history.json
        return
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a1.plot(ep, [h["val_loss"] for h in history], label="val")
    a1.set_xlabel("epoch"), a1.set_ylabel("cross-entropy"), a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], label="train")
    a2.plot(ep, [h["val_acc"] for h in history], label="val")
    a2.set_xlabel("epoch"), a2.set_ylabel("top-1"), a2.set_ylim(0, 1), a2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the loop


def train_module(
    module: nn.Module,
    masks: Mapping[str, torch.Tensor],
    splits: DataSplits,
    config: CompressConfig,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    max_epochs_this_call: int | None = None,
    plot: bool = True,
    train_norms: list[TrainNorm] | None = None,
    output_kind: str = "logits",
) -> TrainResult:
    """Train `module` in place on `splits.train` for `config.epochs` with `masks` (bool, keyed by parameter name;
    a force_core MaskSet is such a mapping) held exactly, resuming from run_dir/checkpoint.pt when it matches.

    Under torchrun (WORLD_SIZE > 1) it runs DDP (gloo on CPU, NCCL on CUDA), each rank taking
    batch_size / world_size images of every global batch; only rank 0 writes files. On CUDA the BatchNorms
    become SyncBatchNorm; on CPU each rank normalises over its share of the batch (see the module's docstring).
    `train_norms` (from force_core.add_train_norm on `module`) are folded into their layers in trained.pt, which
    then fits the module without them. `output_kind` (ImportResult.output_kind) picks the loss (`LOSSES`)."""
    t_start = time.perf_counter()
    loss_fn = LOSSES[output_kind]
    run_dir = Path(run_dir)
    rank, world, local_rank = _dist_env()
    device = resolve_device(config.device)
    own_group = False
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
    is_main = rank == 0
    ckpt_path, hist_path, state_path = run_dir / CHECKPOINT, run_dir / HISTORY, run_dir / TRAINED
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (*run_dir.glob(f".{CHECKPOINT}.*"), *run_dir.glob(f".{TRAINED}.*")):
            stale.unlink(missing_ok=True)  # the temporary file of a save a killed run never renamed into place
    if len(splits.train) == 0:
        raise DataError("the training split is empty")

    _seed_all(config.seed)
    if world > 1 and device.type == "cuda":
        sync_batchnorm_(module)  # before the optimizer; the parameters are the same tensors anyway
    elif world > 1 and is_main and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        say(f"note: BatchNorm on CPU under {world} processes normalises over each process's "
            f"{max(1, config.batch_size // world)} images, not the global batch of {config.batch_size} "
            "(SyncBatchNorm needs CUDA)")
    module.to(device)
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    enforcer = hold_masks(module, masks)
    calibrate = bool(train_norms) and config.recipe == "finetune"
    if calibrate:  # trained weights: the norms fit the dense network's activations, then the pruned one's
        batches = [x.to(device) for x, _ in mask_batches(splits, 128, CALIBRATION_BATCHES, seed=config.seed)]
        calibrate_train_norm(module, train_norms, batches)
    _apply_(enforcer)
    if calibrate:
        recalibrate_train_norm(module, train_norms, batches)
    optimizer = make_optimizer(module, config)
    per_rank_batch = max(1, config.batch_size // world)
    loader = make_loader(splits.train, per_rank_batch, shuffle=True, seed=config.seed, rank=rank, world_size=world,
                         pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    epochs, total_steps = planned_epochs(config.epochs, config.max_steps, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.lr_schedule, total_steps))
    fingerprint = _fingerprint(config, world, splits)
    cpu_masks = {k: v.detach().to("cpu", torch.bool) for k, v in masks.items()}
    # Before each validation the train-time norms' running statistics are re-estimated on these (un-augmented,
    # seeded) training images with the epoch's final weights ("precise BatchNorm"): the running averages trail
    # weights that moved during the epoch, and a pruned channel left with a few weights has so small a variance
    # that 1/√(σ² + ε) turns that lag into offsets that compound from layer to layer in eval mode. Channels then
    # found constant (variance under force_core's CONSTANT_VAR: float noise only) output their β, exactly, in eval
    # mode and in the folded export, instead of that noise amplified.
    # Every rank takes the same global batches: the statistics do not depend on the number of processes.
    recalibration = [x for x, _ in mask_batches(splits, config.batch_size, RECALIBRATION_BATCHES, seed=config.seed)] \
        if train_norms else []

    # Resume: weights, optimizer, scheduler, RNG states and history from the last finished epoch.
    start_epoch, history = 0, []
    if ckpt_path.exists():
        # Our own file in our run directory: full unpickling is needed for numpy's RNG state.
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        same_masks = ckpt.get("masks", {}).keys() == cpu_masks.keys() and all(
            torch.equal(ckpt["masks"][k], v) for k, v in cpu_masks.items()
        )
        if ckpt.get("fingerprint") == fingerprint and same_masks:
            module.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
            start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
            _apply_(enforcer)
            enforcer.mask_optimizer_state_(optimizer)
            if is_main:
                say(f"resuming from epoch {start_epoch} of {epochs} ({ckpt_path})")
        elif is_main:
            warnings.warn(f"{ckpt_path} belongs to another recipe or other masks; training from scratch", stacklevel=2)
    resumed_from = start_epoch

    model = module
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(module, device_ids=ids)

    end_epoch = epochs
    if max_epochs_this_call is not None:
        end_epoch = min(end_epoch, start_epoch + max(0, int(max_epochs_this_call)))
    show = progress and is_main
    for epoch in range(start_epoch, end_epoch):
        loader.set_epoch(epoch)
        model.train()
        steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        bar = Progress(f"train {epoch + 1}/{epochs}", steps, min(len(splits.train), steps * config.batch_size),
                       enabled=show)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct, n
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            if step >= steps:  # --max-steps reached inside this epoch
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            loss, out = train_step(model, x, y, optimizer, enforcer, loss_fn)
            scheduler.step()
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * len(y), (out.argmax(1) == y).sum().double(),
                                     torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
            if show and (step % 5 == 0 or step == steps - 1):
                s = sums.tolist()
                bar.update(1, len(y) * world, loss=s[0] / s[2], acc=s[1] / s[2])
            else:
                bar.update(1, len(y) * world)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0
        bar.close()
        if world > 1:
            dist.all_reduce(sums)
        loss_sum, correct, n = sums.tolist()
        if not math.isfinite(loss_sum):  # every rank sees the reduced sum: all stop alike
            raise TrainingDivergedError(
                f"training diverged: the loss became {loss_sum / n} in epoch {epoch + 1} of {epochs} at lr "
                f"{config.lr:g} ({config.optimizer}); nothing published: give a smaller --lr (and keep --train-norm on "
                "for a network whose BatchNorm was folded at export)")
        if train_norms:  # eval statistics of the weights as they are now: what is validated is what is exported
            recalibrate_train_norm(module, train_norms, _to_device(recalibration, device))
            silence_constant_channels(module, train_norms)
        eval_batch = max(per_rank_batch, scoring_batch(splits.val.shape))  # no more held than a training step
        val_loss, val_acc = evaluate(module, splits.val, batch_size=eval_batch, device=device, loss_fn=loss_fn)
        if not _finite_on_all_ranks(val_loss, world, device):  # before this epoch's checkpoint: the last one stays
            raise TrainingDivergedError(
                f"training diverged: the validation loss became {val_loss} in epoch {epoch + 1} of {epochs} at lr "
                f"{config.lr:g} ({config.optimizer}); nothing published, the checkpoint of the last finite epoch "
                "stays in the run directory: give a smaller --lr (and keep --train-norm on for a network whose "
                "BatchNorm was folded at export)")
        history.append({
            "epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc": correct / n, "val_loss": val_loss,
            "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"], "images_per_s": n / train_s,
            "seconds": train_s, "images": int(n), "steps": steps,
        })
        if show:
            h = history[-1]
            say(f"epoch {epoch + 1}/{epochs}: loss {h['train_loss']:.4f} acc {h['train_acc']:.3f} "
                f"val {h['val_acc']:.3f} lr {h['lr']:.4g} {h['images_per_s']:.0f} img/s")
        rng = [_rng_state()]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if is_main:
            ckpt = {
                "epoch": epoch + 1, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, "masks": cpu_masks, "history": history,
                "fingerprint": fingerprint,
            }
            with atomic_path(ckpt_path) as tmp:
                torch.save(ckpt, tmp)
            write_json_atomic(hist_path, {"fingerprint": fingerprint, "epochs": history})
        if world > 1:
            dist.barrier()

    done = len(history) >= epochs
    last = history[-1] if history else None
    if last is None:  # zero epochs: score the masked network as it is
        vl, va = evaluate(module, splits.val, device=device, loss_fn=loss_fn)
        tl, ta = evaluate(module, splits.train_plain, device=device, loss_fn=loss_fn)
        last = {"train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va, "images_per_s": 0.0}
    if is_main:
        if not hist_path.exists():
            write_json_atomic(hist_path, {"fingerprint": fingerprint, "epochs": history})
        if done:
            state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
            state = fold_train_norm(state, train_norms or [])
            with atomic_path(state_path) as tmp:
                torch.save(state, tmp)
            if plot and history:
                _plot_history(history, run_dir / CURVE)
    this_call = history[resumed_from:] if history else []
    ips = (sum(h["images"] for h in this_call) / sum(h["seconds"] for h in this_call)) if this_call else \
        float(last["images_per_s"])
    if world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return TrainResult(
        state_path=state_path, history_path=hist_path, checkpoint_path=ckpt_path, epochs=len(history),
        epochs_target=epochs, completed=done, resumed_from_epoch=resumed_from,
        train_loss=float(last["train_loss"]), train_acc=float(last["train_acc"]), val_loss=float(last["val_loss"]),
        val_acc=float(last["val_acc"]), images_per_s=float(ips), density=_density(enforcer), device=str(device),
        world_size=world, seconds=time.perf_counter() - t_start,
    )


# ------------------------------------------------------------------------------------------ the stage


def model_io(normalized_path: str | os.PathLike, image_size: tuple[int, int] | None = None) -> tuple[tuple, int]:
    """((C, H, W), num_classes) of an ONNX classifier (stages.onnx_convert.scoring.classifier_io)."""
    _, shape, num_classes = classifier_io(onnx.load(str(normalized_path)), image_size)
    return shape, num_classes


def preprocessing_of(data: DataSplits) -> dict:
    """What a process that loads the data itself needs to prepare it as `data` was (JSON: a torchrun request)."""
    return {"mean": list(data.mean), "std": list(data.std), "geometry": data.geometry.to_dict(),
            "split_file": data.split_file}


def sparse_train(
    normalized_path: str | os.PathLike,
    masks_path: str | os.PathLike,
    config: CompressConfig,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    max_epochs_this_call: int | None = None,
    data: DataSplits | None = None,
    preprocessing: dict | None = None,
    output_kind: str = "logits",
) -> TrainResult:
    """Rebuild the module from `normalized_path` (ONNX import's deterministic re-conversion), load the masks, train
    on `data` (the run's opened data, augmented here as `config.augment` says; None: `config.data` is loaded, as a
    worker process of a data-parallel run does, with `preprocessing` (`preprocessing_of` the run's data) when given,
    else the training split's mean/std and a straight resize), write run_dir/trained.pt. `output_kind`: what the
    model outputs (ImportResult.output_kind), which picks the loss."""
    module, param_map = load_module(normalized_path)
    maskset = load_masks(masks_path, param_map)
    norms = add_train_norm(module) if config.train_norm else []
    if data is None:
        shape, num_classes = model_io(normalized_path, config.image_size)
        prep = preprocessing or {}
        splits = load_data(config.data, shape, num_classes=num_classes, augment=config.augment, mean=prep.get("mean"),
                           std=prep.get("std"), geometry=Geometry.from_dict(prep.get("geometry")),
                           split_file=prep.get("split_file"), **data_options(config))
    else:
        splits = augmented(data, config.augment)
    result = train_module(module, maskset, splits, config, run_dir, progress=progress,
                          max_epochs_this_call=max_epochs_this_call, train_norms=norms, output_kind=output_kind)
    layers = tuple(param_map.to_initializer(f"{n.layer}.weight") for n in norms)
    result = dataclasses.replace(result, train_norm_layers=layers)
    if int(os.environ.get("RANK", 0)) == 0:
        write_json_atomic(Path(run_dir) / RunFiles.TRAIN_RESULT,
                          {**{k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()},
                           "data": splits.source, "mean": splits.mean, "std": splits.std})
    return result


__all__ = ["TrainResult", "evaluate", "hold_masks", "make_optimizer", "model_io", "preprocessing_of", "sparse_train",
           "train_module", "train_step"]
