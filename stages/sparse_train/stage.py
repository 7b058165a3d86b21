"""The sparse-train stage as the pipeline runs it: in this process, or data-parallel under torchrun."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import RunFiles
from pipeline.stage import DATA_FIELDS, Stage
from stages.sparse_train.training import TrainResult, preprocessing_of, sparse_train
from stages.sparse_train.worker import launches, sparse_train_processes


def train_stage(graph: str, masks, config, run_dir: str, data, output_kind: str = "logits") -> TrainResult:
    """Train `graph` (normalized.onnx, or cut.onnx after a channel cut) under `masks` (a MaskResult or CutResult:
    its `masks_path`), with the loss that fits `output_kind` (ImportResult.output_kind). Several processes load
    the data each in their own process; one trains on `data`."""
    masks_path = str(masks.masks_path)
    if launches(config.nproc):  # data-parallel: torchrun runs the training in nproc processes, this one waits
        return sparse_train_processes(graph, masks_path, config, run_dir, preprocessing=preprocessing_of(data),
                                      output_kind=output_kind)
    return sparse_train(graph, masks_path, config, run_dir, data=data, output_kind=output_kind)


def drop_checkpoint(trained: TrainResult, keep: bool) -> None:
    """A finished training's trained.pt holds the result: drop its resume state unless `keep` (--keep-checkpoint)."""
    if trained.completed and not keep:
        Path(trained.checkpoint_path).unlink(missing_ok=True)


# nproc: the world size changes the result slightly (float sums, per-rank BatchNorm statistics on CPU)
STAGE = Stage("sparse-train", train_stage, outputs=(RunFiles.TRAINED,),
              reads=DATA_FIELDS | {"image_size", "train_norm", "augment", "device", "epochs", "max_steps", "batch_size",
                                   "optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "nproc",
                                   "recipe"})
