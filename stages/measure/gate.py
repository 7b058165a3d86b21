"""The gate: each condition a compressed model must meet to be published, with whether it passed and, when not,
by how much it missed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.measure.forms import FORM_LABELS, by_role
from stages.onnx_convert.sparsity import FileSparsity


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    message: str


def gate(config, *, top1: float, sparsity: FileSparsity, parity_rel: float, costs: dict | None = None,
         masks_meta: dict | None = None, latency: dict | None = None) -> list[GateCheck]:
    """Each condition of the gate with whether it passed and, when not, by how much it missed. Under a MACs budget
    `costs` ({"input"|"exported": Costs.to_dict()}) gives the MACs the sparsity is checked on; under a latency budget
    `masks_meta` (masks.json) the priced time kept. With --target-latency the exported file's latency ratio at
    --latency-batch (`latency`: its latency_ms record by batch) is checked instead of a sparsity. --weight-sparsity
    adds a check of the weights removed, read from the file."""
    checks = [
        GateCheck(
            "min_accuracy",
            top1 >= config.min_accuracy,
            f"top-1 accuracy {top1:.4f} vs minimum {config.min_accuracy:.4f}"
            + ("" if top1 >= config.min_accuracy else f" (short by {config.min_accuracy - top1:.4f})"),
        )
    ]
    if config.baseline_accuracy is not None and config.max_drop is not None:
        drop = config.baseline_accuracy - top1
        ok = drop <= config.max_drop + 1e-12
        checks.append(GateCheck(
            "max_drop", ok,
            f"accuracy drop {drop:.4f} from baseline {config.baseline_accuracy:.4f} vs allowed {config.max_drop:.4f}"
            + ("" if ok else f" (over by {drop - config.max_drop:.4f})"),
        ))
    if config.target_latency is not None:
        checks.append(_latency_check(config, latency or {}))
    elif config.budget == "macs":
        checks.append(_macs_check(config, costs or {}))
    elif config.budget == "latency":
        checks.append(_priced_check(config, masks_meta or {}))
    else:
        checks.append(_weights_check(config.sparsity, sparsity))
    if config.weight_sparsity is not None:
        checks.append(_weights_check(config.weight_sparsity, sparsity, "weight_sparsity"))
    ok = parity_rel <= config.parity_tol  # False for NaN
    if not math.isfinite(parity_rel):
        message = "torch/onnxruntime outputs are not finite (NaN or inf: did training diverge?)"
    else:
        message = (f"torch/onnxruntime relative difference {parity_rel:.2e} vs tolerance {config.parity_tol:.0e}"
                   + ("" if ok else f" (over by {parity_rel / config.parity_tol:.1f}x)"))
    checks.append(GateCheck("parity", ok, message))
    return checks


def _macs_check(config, costs: dict) -> GateCheck:
    """The MACs per image of the weight layers (Conv/Gemm/MatMul with a weight), read from both files."""
    before = (costs.get("input") or {}).get("weight_macs") or 0
    after = (costs.get("exported") or {}).get("weight_macs") or 0
    wanted = config.sparsity * before
    removed = before - after
    ok = before > 0 and removed + 1 >= wanted  # within one MAC: the budget keeps round(density * total)
    return GateCheck(
        "sparsity", ok,
        f"MACs removed {removed / max(before, 1):.4f} ({after:,} of {before:,} per image left in the weight layers) "
        f"vs target {config.sparsity:.4f}" + ("" if ok else f" (short by {math.ceil(wanted - 1 - removed):,} MACs)"))


def _priced_check(config, meta: dict) -> GateCheck:
    """The weight layers' time as priced by their measured per-layer latencies (masks.json: kept_cost of
    total_cost): what a latency budget removes; the file's own latency is measured beside it, not gated."""
    kept, total = meta.get("kept_cost"), meta.get("total_cost")
    removed = 1 - kept / total if kept is not None and total else 0.0
    ok = bool(total) and removed + 1 / total >= config.sparsity - 1e-12
    return GateCheck(
        "sparsity", ok,
        f"priced layer time removed {removed:.4f} (per-layer latencies at batch {config.latency_batch}) vs target "
        f"{config.sparsity:.4f}" + ("" if ok else f" (short by {config.sparsity - removed:.4f})"))


def _latency_check(config, latency: dict) -> GateCheck:
    """The exported file's latency ÷ the input's at --latency-batch, the median of interleaved rounds."""
    ratio = ((latency.get(str(config.latency_batch)) or {}).get("ratio") or {}).get("median")
    ok = ratio is not None and ratio <= config.target_latency
    shown = "not measured" if ratio is None else f"{ratio:.3f}"
    return GateCheck(
        "latency", ok,
        f"latency ÷ input at batch {config.latency_batch} {shown} vs target {config.target_latency:g}"
        + ("" if ok or ratio is None else f" (over by {ratio - config.target_latency:.3f})"))


def _weights_check(target: float, sparsity: FileSparsity, name: str = "sparsity") -> GateCheck:
    # "Within one weight": exact top-k keeps round(density * total), which may sit one weight short.
    wanted = target * sparsity.prunable_total
    ok = sparsity.prunable_total > 0 and sparsity.prunable_zeros + 1 >= wanted
    return GateCheck(
        name, ok,
        f"sparsity {sparsity.sparsity:.4f} ({sparsity.prunable_zeros}/{sparsity.prunable_total} prunable weights zero)"
        f" vs target {target:.4f}"
        + ("" if ok else f" (short by {math.ceil(wanted - 1 - sparsity.prunable_zeros)} weights)"),
    )


def form_checks(config, forms: list[dict]) -> list[GateCheck]:
    """The gate for the forms beside the primary file: each reaches the minimum accuracy; the INT8 file keeps every
    pruned weight at exactly 0 and, with --max-drop, loses at most that much against the FP32 export."""
    roles = by_role(forms)
    fp32, checks = roles["fp32"], []
    for f in forms:
        if f["role"] in ("input", "fp32"):
            continue
        label = FORM_LABELS[f["role"]]
        ok = f["top1"] >= config.min_accuracy
        checks.append(GateCheck(f"min_accuracy_{f['role']}", ok,
                                f"{label}: top-1 {f['top1']:.4f} vs minimum {config.min_accuracy:.4f}"
                                + ("" if ok else f" (short by {config.min_accuracy - f['top1']:.4f})")))
    int8 = roles.get("int8")
    if int8 is not None:
        lost = fp32["prunable_zeros"] - int8["prunable_zeros"]
        ok = int8["prunable_total"] == fp32["prunable_total"] and lost <= 0
        more = -lost if lost < 0 else 0
        checks.append(GateCheck("int8_sparsity", ok,
                                f"INT8 prunable weights at zero: {int8['prunable_zeros']:,} of "
                                f"{int8['prunable_total']:,} vs FP32 {fp32['prunable_zeros']:,} of "
                                f"{fp32['prunable_total']:,}"
                                + (f" ({more:,} more rounded to 0)" if ok and more else "")
                                + ("" if ok else " (pruned weights lost their zero)")))
        if config.max_drop is not None:
            drop = fp32["top1"] - int8["top1"]
            ok = drop <= config.max_drop + 1e-12
            checks.append(GateCheck("int8_max_drop", ok,
                                    f"INT8 drop {drop:.4f} from the FP32 export's {fp32['top1']:.4f} vs allowed "
                                    f"{config.max_drop:.4f}"
                                    + ("" if ok else f" (over by {drop - config.max_drop:.4f})")))
    return checks
