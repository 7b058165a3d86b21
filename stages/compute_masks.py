"""Stage `compute_masks`: pruning masks at initialization for an imported ONNX model, written as
`masks.npz` keyed by ONNX initializer name plus a `masks.json` sidecar (DESIGN.md, mask file), so users
and other tools read them without this package. Imports force_core, torch and `pipeline`; never flows,
prefect or click.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

import force_core
from force_core.channels import ChannelFloorError
from force_core.losses import LOSSES
from pipeline.artifacts import RunFiles, sha256_file
from pipeline.data import mask_batches
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError
from pipeline.stage import DATA_FIELDS, Stage
from stages.measure.latency import interleaved_latency
from stages.measure.layer_prices import latency_prices
from stages.onnx_convert import runtime
from stages.onnx_convert.channels import Plan, analyze, cut_channels, keep_arrays
from stages.onnx_convert.costs import macs_per_weight
from stages.onnx_convert.mask_file import effective_sidecar, save_masks
from stages.onnx_convert.param_map import ParamMap
from stages.onnx_convert.passes._graph import real_inputs
from stages.onnx_convert.to_torch import load_module

__all__ = ["STAGE", "MaskResult", "compute_masks_stage", "mask_batch_count", "masks_stage"]


@dataclass(frozen=True)
class MaskResult:
    masks_path: Path
    meta_path: Path
    density: float  # achieved kept fraction of the prunable weights
    kept: int
    total: int
    disconnected: tuple[str, ...]  # initializer names left with no weight
    method: str = ""
    seconds: float = 0.0
    effective_density: float | None = None  # kept weights on an input→output path / all; None: not measured
    cut_layers: tuple[str, ...] = ()  # initializer names with no kept weight on any path
    # channel structure: the graph's channel analysis the masks were computed on, handed to the cut stage so that
    # the graph is analysed once per run
    channel_plan: Plan | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        effective = "" if self.effective_density is None else f", effective {self.effective_density:.4f}"
        return f"density {self.density:.4f} ({self.kept} kept of {self.total}){effective}"


def compute_masks_stage(normalized_path: str | os.PathLike, out_path: str | os.PathLike, *, method: str,
                        density: float, steps: int | None = None, schedule: str = "exp",
                        batches: Iterable | None = None, batches_per_step: int = 1, seed: int = 0,
                        progress: Callable | None = None, device: str = "auto", train_norm: bool = False,
                        calibrate_norms: bool = False, on_collapse: str = "nested", collapse_ratio: float | None = None,
                        min_per_layer: int = 0, structure: str = "unstructured",
                        channel_multiple: int | None = None, output_kind: str = "logits", budget: str = "params",
                        latency_batch: int = 1, target_latency: float | None = None,
                        weight_sparsity: float | None = None, channel_ranking: str = "global") -> MaskResult:
    """Masks over the ParamMap's prunable weights (Conv/ConvTranspose/Gemm/MatMul initializers), on
    `device` (auto: CUDA when present; the sidecar records which, as masks may differ across devices).
    `train_norm`: BatchNorm-fused layers get their train-time BatchNorm (batch statistics, as training uses);
    `calibrate_norms`: made the identity on the first batches (trained weights: their function is what is scored).
    `min_per_layer`: weights every layer keeps at least, lowered to what k allows (fewer kept weights than
    layers leave some layer empty whatever the method; the cut check reports it).
    `structure="channel"`: whole channel groups (from the graph's dependency analysis) are kept or pruned; the
    sidecar lists the kept channels of each group, which the cut stage removes from the graph; `channel_multiple`:
    they are kept in blocks of that many per group (None: the block `device`'s onnxruntime computes channels in,
    `runtime.channel_block`); `budget="macs"`: `density` is the fraction of the prunable
    weights' multiply-accumulates per image kept, not of the weights (channels are then priced by what they
    compute: a channel at 56×56 costs 64 times one at 7×7); `budget="latency"`: of the weight layers' time, each
    layer timed alone on onnxruntime at `latency_batch` images (`stages.measure.layer_prices`).
    `target_latency`: the density is searched for (`_latency_search`) so that the cut model runs in at most that
    fraction of the input's time at `latency_batch` on onnxruntime; `density` is then not used.
    `weight_sparsity` (with `budget` macs or latency): at least that fraction of the prunable weights is removed as
    well, the channels chosen within both budgets. `channel_ranking`: "global" ranks channels by their score,
    "per-group" by their score over their group's mean."""
    if method not in force_core.available_methods(structure):
        known = ", ".join(sorted(force_core.available_methods(structure)))
        kind = "" if structure == "unstructured" else f"{structure} "
        raise BadInputError(f"unknown {kind}method {method!r}; choose one of {known}")
    if not 0.0 < density <= 1.0:
        raise BadInputError(f"density must be in (0, 1] (kept fraction), got {density}")
    batches = list(batches) if batches is not None else []
    if not batches:
        if force_core.needs_data(method, structure):
            free = ", ".join(sorted(force_core.data_free_methods(structure)))
            raise BadInputError(f"method {method!r} scores weights on data: give --data (data-free methods: {free})")
        batches = [_dummy_batch(normalized_path)]
    device = resolve_device(str(device))
    module, param_map = load_module(normalized_path)
    norms = force_core.add_train_norm(module) if train_norm else []
    module.to(device)
    if calibrate_norms:
        calibration = batches[:force_core.CALIBRATION_BATCHES]
        force_core.calibrate_train_norm(module, norms, (x.to(device) for x, _ in calibration))
    n_weights = sum(p.numel() for n, p in module.named_parameters() if n in set(param_map.prunable))
    min_per_layer = min(min_per_layer, force_core.kept_count(density, n_weights) // max(1, len(param_map.prunable)))
    started = time.perf_counter()
    plan = None
    if structure == "channel":
        graph = onnx.load(str(normalized_path))
        plan = analyze(graph)
        if channel_multiple is None:
            channel_multiple = runtime.channel_block(device.type)
        costs = _budget_costs(budget, graph, param_map, batches[0][0], batch=latency_batch, device=device,
                              multiple=channel_multiple)

        def masks_at(d: float):
            return _channel_masks(module, graph, plan, param_map, batches, method=method, density=d, steps=steps,
                                  schedule=schedule, batches_per_step=batches_per_step, seed=seed,
                                  progress=progress, multiple=channel_multiple, loss_fn=LOSSES[output_kind],
                                  costs=costs, unit=BUDGET_UNITS[budget], on_collapse=on_collapse,
                                  weight_density=None if weight_sparsity is None else 1.0 - weight_sparsity,
                                  per_group=channel_ranking == "per-group",
                                  **({} if collapse_ratio is None else {"collapse_ratio": collapse_ratio}))

        if target_latency is None:
            maskset, channel_meta = masks_at(density)
        else:
            density, maskset, channel_meta = _latency_search(masks_at, graph, plan, tuple(batches[0][0].shape[1:]),
                                                             target=target_latency, batch=latency_batch,
                                                             device=str(device))
    else:
        maskset, channel_meta = _unstructured_masks(
            module, param_map, batches, method=method, density=density, steps=steps, schedule=schedule,
            batches_per_step=batches_per_step, seed=seed, progress=progress, on_collapse=on_collapse,
            min_per_layer=min_per_layer, collapse_ratio=collapse_ratio, loss_fn=LOSSES[output_kind])
    seconds = time.perf_counter() - started
    effective = force_core.effective_sparsity(module, maskset, batches[0][0])
    meta = {
        "method": method, "structure": structure, "target_density": density, "target_sparsity": 1.0 - density,
        "schedule": schedule, "steps": steps, "seed": seed, "batches": len(batches), "budget": budget,
        "batches_per_step": batches_per_step, "source_sha256": sha256_file(normalized_path),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device),
        "python": platform.python_version(), "seconds": round(seconds, 3), "min_per_layer": min_per_layer,
        "train_norm_layers": [param_map.to_initializer(f"{n.layer}.weight") for n in norms],
        **{k: maskset.meta.get(k) for k in ("on_collapse", "collapse_step", "step_losses")},
        **channel_meta,
    }
    meta.update(effective_sidecar(effective, param_map))
    masks_path, meta_path, summary = save_masks(out_path, maskset, param_map, meta)
    return MaskResult(masks_path=masks_path, meta_path=meta_path, density=summary["density"],
                      kept=summary["kept_total"], total=summary["total"],
                      disconnected=tuple(summary["disconnected"]), method=method, seconds=seconds,
                      effective_density=effective.effective_density, cut_layers=tuple(meta["cut_layers"]),
                      channel_plan=plan)


def _unstructured_masks(module, param_map: ParamMap, batches, *, collapse_ratio, **kwargs):
    try:
        maskset = force_core.compute_masks(module, batches, params=param_map.prunable, **kwargs,
                                           **({} if collapse_ratio is None else {"collapse_ratio": collapse_ratio}))
    except ValueError as e:  # force_core checks its arguments with ValueError: user input here
        raise BadInputError(str(e)) from None
    return maskset, {}


def _budget_costs(budget: str, model: onnx.ModelProto, param_map: ParamMap, images: torch.Tensor, *, batch: int,
                  device, multiple: int) -> dict[str, int] | None:
    """Prunable parameter -> what one of its weights costs under `budget` at the images' size: the MACs it performs
    per image ("macs"), the picoseconds its layer spends on it at `batch` images on onnxruntime ("latency"); None for
    "params" (each weight costs one). A weight whose shapes inference could not settle costs one unit."""
    shape = tuple(int(d) for d in images.shape[1:])
    if budget == "macs":
        per_weight = macs_per_weight(model, shape)
    elif budget == "latency":
        per_weight = latency_prices(model, shape, batch=batch, device=str(device), multiple=multiple)
    else:
        return None
    return {n: per_weight.get(param_map.to_initializer(n), 1) for n in param_map.prunable}


# The search aims this far under the target: a ratio measured again (validation, 30 interleaved rounds) moves by a few
# percent on a loaded machine, and the gate checks that measurement.
LATENCY_AIM = 0.97
LATENCY_PROBES = 5


def _latency_search(masks_at, model: onnx.ModelProto, plan: Plan, input_shape: tuple[int, ...], *, target: float,
                    batch: int, device: str):
    """(density, masks, sidecar entries) of the largest density whose cut model, timed against the uncut one in
    interleaved rounds at `batch` images, runs at most LATENCY_AIM × `target` of its time: secant steps on the
    measured ratio from (density 1, ratio 1), at most LATENCY_PROBES mask computations. BadInputError naming the
    fastest ratio measured when none reaches `target`."""
    aim = LATENCY_AIM * target
    full = runtime.timed_session(model.SerializeToString(), device=device)  # as the gate times the published file
    probes: list[dict] = []
    found: dict[float, tuple] = {}
    points = [(1.0, 1.0)]
    density = target
    for _ in range(LATENCY_PROBES):
        try:
            maskset, meta = masks_at(density)
        except _FloorInputError as e:
            if density >= 0.999:
                raise
            # below every group's floor: come back up, to the floor itself where it is known (a large
            # --channel-multiple puts it far above the aim)
            floor = 1.0 - e.reachable if e.reachable is not None else 0.0
            density = min(0.999, max(density * 1.5, floor * 1.001))
            continue
        cut = cut_channels(model, plan.analysis, keep_arrays(meta["channel_sizes"], meta["channels"]), plan=plan)
        timed = interleaved_latency([full, runtime.timed_session(cut.SerializeToString(), device=device)],
                                    input_shape, batch=batch, runs=15, budget_s=6.0)
        ratio = timed[1]["ratio"]["median"]
        probes.append({"sparsity": round(1 - density, 6), "ratio": round(ratio, 4)})
        found[density] = (maskset, meta, ratio)
        if aim - 0.03 <= ratio <= aim:
            break
        (d0, r0), (d1, r1) = points[-1], (density, ratio)
        points.append((d1, r1))
        slope = (r1 - r0) / (d1 - d0) if d1 != d0 else 0.0
        step = (aim - r1) / slope if slope > 1e-6 else -0.5 * d1
        density = float(min(0.999, max(0.005, d1 + step, d1 / 4)))
    met = [d for d, (_, _, r) in found.items() if r <= target]
    if not met:
        best = min(probes, key=lambda p: p["ratio"]) if probes else None
        fastest = f"; the fastest measured was {best['ratio']:.3f} at sparsity {best['sparsity']:.4f}" if best else ""
        raise BadInputError(f"--target-latency {target:g} at batch {batch} is out of reach{fastest} (the layers no "
                            "channel cut reaches take the rest); give a higher --target-latency")
    within = [d for d in met if found[d][2] <= aim] or met
    density = max(within)
    maskset, meta, ratio = found[density]
    return density, maskset, {**meta, "target_latency": target, "latency_batch": batch, "latency_probes": probes,
                              "latency_ratio": round(ratio, 4)}


BUDGET_UNITS = {"params": "prunable weights", "macs": "MACs per image of the prunable weights",
                "latency": "picoseconds of the prunable layers' time"}


def _channel_masks(module, model: onnx.ModelProto, plan: Plan, param_map: ParamMap, batches, *,
                   unit: str = BUDGET_UNITS["params"], **kwargs):
    """Channel masks over the groups the graph analysis `plan` of `model` finds; the sidecar entries that the cut
    stage reads."""
    analysis = plan.analysis
    groups = torch_channel_groups(analysis, param_map, reading_axes(model))
    blocked = [f"{b.node} ({b.op_type}): {b.reason}" for b in analysis.blocked]
    if not groups:
        # the input's channels and the classifier's outputs are fixed in every model: name the other causes first
        fixed = [b for b in analysis.blocked if b.op_type == "graph input" or "graph output" in b.reason]
        causes = [f"{b.node} ({b.op_type}): {b.reason}" for b in analysis.blocked if b not in fixed] or blocked
        why = f"; kept whole: {'; '.join(causes[:3])}" if causes else ""
        raise BadInputError("--structure channel: the model has no channel that can be pruned"
                            f"{why}; use --structure unstructured")
    try:
        result = force_core.compute_channel_masks(module, batches, groups, params=param_map.prunable, **kwargs)
    except ChannelFloorError as e:
        raise _FloorInputError(_floor_message(e, unit), None if e.weights else e.reachable) from None
    except ValueError as e:  # force_core checks its arguments with ValueError: user input here
        raise BadInputError(str(e)) from None
    keep = {name: torch.nonzero(k).flatten().tolist() for name, k in result.keep.items()}
    meta = {"channels": keep, "channel_sizes": {g.name: g.size for g in groups},
            "channels_kept": sum(len(v) for v in keep.values()), "channels_total": sum(g.size for g in groups),
            "blocked": blocked, "channel_multiple": result.meta["multiple"],
            **{k: v for k, v in result.meta.items() if k in ("step_losses", "achieved_density", "unprunable_groups",
                                                               "kept_cost", "total_cost", "weight_density",
                                                               "ranking")}}
    return result.masks, meta


def reading_axes(model) -> dict[str, set[int]]:
    """Initializer -> the axes of it that index a layer's INPUT channels (Conv: 1, and 0 of a depthwise weight,
    whose output channel c reads input channel c; ConvTranspose: 0; Gemm/MatMul: the contracted axis)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out: dict[str, set[int]] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in shapes:
            continue
        w, shape = node.input[1], shapes[node.input[1]]
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Conv":
            depthwise = attrs.get("group", 1) > 1 and len(shape) > 1 and shape[1] == 1
            out[w] = {1, 0} if depthwise else {1}
        elif node.op_type == "ConvTranspose":
            out[w] = {0}
        elif node.op_type == "Gemm":
            out[w] = {1 if attrs.get("transB", 0) else 0}
        elif node.op_type == "MatMul" and len(shape) >= 2:
            out[w] = {len(shape) - 2}
    return out


def torch_channel_groups(analysis, param_map: ParamMap, reading: dict[str, set[int]]) -> list:
    """The analysis' ONNX-level groups as force_core's: initializer slices become parameter slices (a transposed
    import swaps the axes of a matrix), marked as consumers where they index a layer's input channels
    (`reading_axes`); running statistics are left out, since masking never touches them."""
    groups = []
    for g in analysis.groups:
        slices = []
        for s in g.slices:
            if s.kind == "stat" or s.initializer not in param_map.canonical:
                continue
            name = param_map.to_param(s.initializer)
            entry = param_map.entries[name]
            if entry.kind != "parameter":
                continue
            dim = (1 - s.axis) if entry.transpose else s.axis
            consumer = s.kind == "weight" and s.axis in reading.get(s.initializer, ())
            slices.append(force_core.ChannelSlice(name, dim, s.offset, s.block, consumer))
        if slices:
            groups.append(force_core.ChannelGroup(g.name, g.size, tuple(slices)))
    return groups


class _FloorInputError(BadInputError):
    """A sparsity beyond every channel group's floor; `reachable`: the largest sparsity of the first budget that is
    not (None when the floor is the weight budget's or no group can shrink)."""

    def __init__(self, message: str, reachable: float | None):
        super().__init__(message)
        self.reachable = reachable


def _floor_message(e: ChannelFloorError, unit: str) -> str:
    """force_core's message in the CLI's words: every group keeps one block of --channel-multiple channels."""
    if e.reachable is None:
        return (f"--structure channel: nothing can be pruned in blocks of --channel-multiple {e.multiple}: no "
                f"channel group has more than {e.multiple} channels; give a smaller --channel-multiple")
    option, unit = ("--weight-sparsity", BUDGET_UNITS["params"]) if e.weights else ("--sparsity", unit)
    return (f"{option} {e.sparsity:.4g} is out of reach with --structure channel: every channel group keeps at "
            f"least one block of --channel-multiple {e.multiple} channels, {e.floor:,} of the {e.total:,} {unit}, "
            f"so the largest reachable sparsity is {e.reachable:.4f}; give a {option} up to that or a smaller "
            "--channel-multiple")


def mask_batch_count(method: str, steps: int | None, batches_per_step: int, structure: str = "unstructured") -> int:
    """How many mini-batches a mask computation uses: fresh ones at every step, as the reference code draws
    them (FORCE.md), so an iterative method takes steps × batches_per_step (cycled when fewer are given)."""
    try:
        spec = force_core.registry.get_method(method, structure)
    except ValueError:  # reported by compute_masks_stage
        return batches_per_step
    return (1 if spec.single_shot else (steps or spec.default_steps)) * batches_per_step


def _dummy_batch(normalized_path) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free methods still run the model once (synflow needs a forward pass of ones): one input of
    the model's shape, labels 0."""
    model = onnx.load(str(normalized_path), load_external_data=False)
    dims = real_inputs(model.graph)[0].type.tensor_type.shape.dim[1:]
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 32 for d in dims]
    return torch.zeros((2, *shape)), torch.zeros(2, dtype=torch.long)


def masks_stage(normalized_path: str, run_dir: str, config, data, output_kind: str = "logits") -> MaskResult:
    """The pipeline's masks for `normalized_path`, on the mini-batches of the run's opened `data` this method uses,
    with a progress bar; scored with the loss of the model's output (`output_kind`: ImportResult.output_kind)."""
    n = mask_batch_count(config.method, config.steps, config.mask_batches_per_step, config.structure)
    batches = mask_batches(data, config.mask_batch_size, n, seed=config.seed)
    # disable=None: no carriage-return bar in non-terminal logs (CI jobs)
    bar = tqdm(total=config.steps, desc=f"masks ({config.method})", leave=False, unit="step", disable=None)

    def progress(step: int, total: int, info: dict) -> None:
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in info.items() if isinstance(v, float)}, refresh=False)

    try:
        return compute_masks_stage(
            normalized_path, Path(run_dir) / RunFiles.MASKS, method=config.method, density=config.density,
            steps=config.steps, schedule=config.schedule, batches=batches,
            batches_per_step=config.mask_batches_per_step, seed=config.seed, progress=progress,
            device=resolve_device(config.device), train_norm=config.train_norm,
            calibrate_norms=config.recipe == "finetune", on_collapse=config.on_collapse,
            min_per_layer=config.min_per_layer, structure=config.structure, channel_multiple=config.channel_multiple,
            output_kind=output_kind, budget=config.budget, latency_batch=config.latency_batch,
            target_latency=config.target_latency, weight_sparsity=config.weight_sparsity,
            channel_ranking=config.channel_ranking,
        )
    finally:
        bar.close()


STAGE = Stage("masks", masks_stage, outputs=(RunFiles.MASKS, RunFiles.MASKS_META),
              reads=DATA_FIELDS | {"method", "sparsity", "structure", "steps", "schedule", "mask_batch_size",
                                   "mask_batches_per_step", "min_per_layer", "on_collapse", "channel_multiple",
                                   "budget", "latency_batch", "target_latency", "weight_sparsity", "channel_ranking",
                                   "train_norm", "recipe", "device"})
