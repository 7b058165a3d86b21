"""Everything checked about a request before any file is written, done once per run: the model, its input
signature, the data (opened here, and handed to every stage that needs it), the devices, the registry and the runs
directory. Also the check between masks and training that the masks left a network that can learn."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.artifacts import RUN_ID_TEMPLATE, check_writable_dir, run_dir_for, sha256_file
from pipeline.config import CompressConfig, data_options
from pipeline.data import DataSplits, load_data
from pipeline.devices import resolve_device
from pipeline.errors import NetworkCutError
from pipeline.preprocessing import resolve
from stages import compute_masks, cut_channels, import_onnx
from stages.onnx_convert import runtime
from stages.onnx_convert.model_checks import check_finite_weights, has_attention
from stages.onnx_convert.model_io import load_checked, model_bytes
from stages.onnx_convert.scoring import accuracy, classifier_io
from stages.publish import check_registry
from stages.publish.manifest import check_model_name
from stages.quantize import check_not_quantized
from stages.sparse_train import stage as sparse_train
from stages.sparse_train.worker import check_nproc

# The stages whose results the run directory holds: it is keyed on the fields they read, less those that only decide
# whether a check passes (a new --parity-tol redoes import's check in the same directory; its unchanged
# normalized.onnx keeps the masks' key).
RUN_DIR_STAGES = (import_onnx.STAGE, compute_masks.STAGE, cut_channels.STAGE, sparse_train.STAGE)
CHECK_ONLY_FIELDS = frozenset({"parity_tol", "max_bad_fraction", "workers"})


@dataclass(frozen=True)
class Request:
    """What the checks before any work found out about the input, and the data they opened for the whole run."""

    model_path: str
    source_sha256: str
    input_shape: tuple[int, int, int]
    num_classes: int
    run_dir: str
    data: DataSplits = field(repr=False, compare=False)
    input_top1: float | None = None  # the input model on the held-out split (onnxruntime, as validation scores)
    input_top5: float | None = None
    recipe: str = "scratch"  # the training recipe the run uses (`recipe_for`)
    recipe_reason: str = ""
    attention: bool = False  # the network multiplies activations: its recipe trains with AdamW

    def settle(self, config: CompressConfig) -> CompressConfig:
        """`config` as this request runs it: under its recipe, and with the input's top-1 as the baseline of
        --max-drop when none is given."""
        config = config.with_recipe(self.recipe, self.attention)
        if config.max_drop is None or config.baseline_accuracy is not None or self.input_top1 is None:
            return config
        return config.model_copy(update={"baseline_accuracy": self.input_top1})

    def describe_input(self, config: CompressConfig) -> list[str]:
        """What the checks found about the input, one line each: its score, the preprocessing and the recipe, and a
        warning when --max-drop would be measured from a score near chance."""
        capped = f" (of {self.data.val_total}, --val-images)" if self.data.val_total else ""
        lines = [f"input model: top-1 {self.input_top1:.4f}, top-5 {self.input_top5:.4f} on {len(self.data.val)} "
                 f"held-out images{capped} (onnxruntime)",
                 f"preprocessing: {self.data.geometry.describe()} (from {self.data.geometry_from}); mean/std from "
                 f"{self.data.normalization}",
                 f"data: {self.data.source}, {self.data.held}" + (f"; split {self.data.split_file}"
                                                                   if self.data.split_file else ""),
                 self.recipe_reason]
        if config.max_drop is not None and config.baseline_accuracy is None and self.looks_untrained:
            lines.append(f"warning: the input scores {self.input_top1:.4f} with {self.num_classes} classes, near "
                         "chance: it looks untrained or given the wrong preprocessing (--mean/--std), so --max-drop "
                         "measured from it says little; give --baseline-accuracy, or use `force-compress sweep`, "
                         "which trains a dense baseline")
        return lines

    @property
    def looks_untrained(self) -> bool:
        return self.input_top1 is not None and self.input_top1 < 2.0 / max(self.num_classes, 2)


def finetune_threshold(num_classes: int) -> float:
    """The held-out top-1 from which `--recipe auto` takes an input as trained: 3× chance (0.3 with 10 classes,
    0.003 with 1000), at most halfway from chance to 1 (0.75 with 2 classes)."""
    chance = 1.0 / max(num_classes, 1)
    return min(3.0 * chance, chance + 0.5 * (1.0 - chance))


def recipe_for(config: CompressConfig, top1: float, num_classes: int, attention: bool = False) -> tuple[str, str]:
    """(recipe, one line saying why): `--recipe auto` fine-tunes an input that scores well above chance; a network
    with attention trains with AdamW (said on the line)."""
    optimizer = ""
    if attention:
        run = config.with_recipe("finetune" if config.recipe == "finetune" else "scratch", attention)
        optimizer = f"; attention (a MatMul of two activations): {run.optimizer} lr {run.lr:g}"
    if config.recipe != "auto":
        return config.recipe, f"recipe: {config.recipe} (--recipe{optimizer})"
    threshold, chance = finetune_threshold(num_classes), 1.0 / max(num_classes, 1)
    if top1 >= threshold:
        run = config.with_recipe("finetune", attention)
        return "finetune", (f"recipe: finetune (auto: the input scores {top1:.4f}, at least {threshold:.3f} with "
                            f"chance at {chance:.3f}: trained weights, fine-tuned: {run.method} masks, "
                            f"{run.optimizer} lr {run.lr:g}, {run.epochs} epoch(s); --recipe scratch for the "
                            "from-initialization recipe)")
    return "scratch", (f"recipe: scratch (auto: the input scores {top1:.4f}, under {threshold:.3f} with chance at "
                       f"{chance:.3f}: it looks untrained{optimizer})")


def run_fingerprint(config: CompressConfig, stages=RUN_DIR_STAGES) -> dict:
    """The fields the run directory of `config` is keyed on (with the input model's hash): those `stages` read."""
    fields = frozenset().union(*(s.reads for s in stages)) - CHECK_ONLY_FIELDS
    return config.model_dump(mode="json", include=set(fields))


def check_request(config: CompressConfig) -> Request:
    """Everything that can be checked about the input before the run directory is created: the model file
    is readable ONNX with one image input, the data fits it, the devices and processes exist, the registry and
    runs directories are usable (an MLflow registry: its URI is one we can use and its server answers)."""
    check_model_name(config.model_name)
    resolve_device(config.device)  # CUDA asked for but absent: exit 3 before any work
    check_nproc(config.nproc, config.device)  # more processes than GPUs: exit 2
    model = load_checked(config.model)
    check_finite_weights(model)  # before onnxruntime scores it: NaN logits would only look like a bad model
    if config.quantize == "int8":
        check_not_quantized(model, Path(config.model).name)
    _, input_shape, num_classes = classifier_io(model, config.image_size)
    prep = resolve(config.preprocessing_options(), {p.key: p.value for p in model.metadata_props}, input_shape[0],
                   input_shape[1:], Path(config.model).name)
    size = model_bytes(config.model)
    # estimates: a run holds the graph a few times over (normalized, checkpoint with optimizer state, the exported
    # forms), a version the published forms
    check_registry(config.registry, config.model_name, need_bytes=3 * size)
    check_writable_dir(config.runs_dir, "runs-dir", below=(RUN_ID_TEMPLATE,), need_bytes=8 * size)
    data = load_data(config.data, input_shape, num_classes=num_classes, augment=False, mean=prep.mean, std=prep.std,
                     geometry=prep.geometry, split_file=split_file_for(config), **data_options(config))
    data = replace(data, normalization=prep.normalization, geometry_from=prep.geometry_from)
    source_sha = sha256_file(config.model)
    top1, top5 = accuracy(runtime.session(config.model, device=resolve_device(config.device)), data.val)
    attention = has_attention(model)
    recipe, why = recipe_for(config, top1, num_classes, attention)
    request = Request(str(config.model), source_sha, input_shape, num_classes, "", data, top1, top5, recipe, why,
                      attention)
    run_dir = run_dir_for(config.runs_dir, source_sha, run_fingerprint(request.settle(config)))
    return replace(request, run_dir=str(run_dir))


def split_file_for(config: CompressConfig) -> Path:
    """Where the held-out split of a file source is kept, shared by every run over the same data, seed and
    fraction (so validation, resume and a sweep's cells score the same images); each run directory keeps a copy."""
    spec = config.data
    scheme, _, arg = spec.partition(":")
    if arg and "://" not in arg:
        spec = f"{scheme}:{Path(arg).expanduser().resolve()}"
    key = hashlib.sha256(json.dumps([spec, config.seed, config.val_fraction]).encode()).hexdigest()[:16]
    return Path(config.runs_dir) / "splits" / f"{scheme}-{key}.json"


def hand_over(config: CompressConfig, request: Request) -> None:
    """Keep `request` (checked for `config`) for the next `checked_request(config)` in this process: the CLI checks
    before it starts the flow, and the flow takes the result, data included, instead of checking again."""
    with _LOCK:
        _HANDED_OVER[_handoff_key(config)] = request


def checked_request(config: CompressConfig) -> Request:
    """The request handed over for this very config and model file (taken, once), else a fresh check."""
    with _LOCK:
        request = _HANDED_OVER.pop(_handoff_key(config), None)
    return request if request is not None else check_request(config)


_HANDED_OVER: dict[tuple, Request] = {}
_LOCK = threading.Lock()


def _handoff_key(config: CompressConfig) -> tuple:
    try:
        st = Path(config.model).stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        stamp = None
    return config.model_dump_json(), str(Path(config.model).resolve()), stamp


# A mask set with fewer than this fraction of its kept weights on an input→output path (effective density /
# density) is stopped before training, as is one with none. Measured on the benchmark networks (issue 11; digits,
# 30 epochs; chance 0.101): every mask set with no weight on a path trained to 0.101; random masks with 0.017,
# 0.036 and 0.093 of their weights on a path (resnet20 at 99.7%, vgg19 at 99.5%) reached 0.101–0.123; from 0.10
# up they trained above chance (0.101 → 0.268, 0.18 → 0.196, 0.33 → 0.223, 0.39 → 0.408). A healthy mask set
# may still waste many weights: random at 95% on mobilenet_v3_small keeps 0.25 on a path, at 98% on vgg19 0.53
# (top-1 0.966); FORCE and Iterative SNIP kept ≥ 0.79 in every benchmark cell that trained above chance.
CUT_FRACTION = 0.1


def check_cut(masks, config: CompressConfig) -> None:
    """Raise NetworkCutError (exit 1, before training) when the masks cut every input→output path, or leave
    fewer than CUT_FRACTION of the kept weights on one. Masks not measured (effective_density None) pass."""
    effective = masks.effective_density
    if effective is None or (effective > 0 and effective >= CUT_FRACTION * masks.density):
        return
    cut = masks.cut_layers
    empty = [n for n in cut if n in masks.disconnected]  # the cause, when there is one: named first
    cut_off = [n for n in cut if n not in masks.disconnected]
    names = "; ".join(f"{label}: {_first(group)}" for label, group in (("empty", empty), ("cut off", cut_off)) if group)
    where = f"{len(cut)} layer(s) keep no weight on an input→output path ({names})" if cut else \
        "no layer is cut off, but almost no kept weight lies on an input→output path"
    raise NetworkCutError(
        f"the masks cut the network: {where}; effective density {effective:.4g} vs target {config.density:.4g}. "
        f"Try --method iter_snip, a lower --sparsity or more --steps (masks kept in {masks.masks_path}; "
        "--no-cut-check trains anyway)")


def _first(names, n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
