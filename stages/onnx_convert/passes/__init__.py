"""Normalisation passes run on the ModelProto before conversion. Each takes the model, rewrites it in
place and returns one line per change, so the import report says exactly what differs from the source."""

from __future__ import annotations

import onnx

from stages.onnx_convert.passes import (
    computed_weights,
    dynamic_batch,
    fold_constants,
    initializer_inputs,
    spellings,
    unshare,
)

# Order matters: constants become initializers before sharing is resolved, and the batch pass sees
# the final initializers (Reshape targets held in Constant nodes are initializers by then).
# Computed weights are folded after unshare has resolved the Identity nodes that only rename a stored weight: a
# weight fed through one is the exporter's de-duplication (unshare's to untie) or the model's own tie (kept), not a
# computation to fold.
PASSES = (initializer_inputs.run, spellings.run, fold_constants.run, unshare.run, computed_weights.run,
          dynamic_batch.run)


def normalize(model: onnx.ModelProto) -> list[str]:
    changes: list[str] = []
    for run in PASSES:
        changes.extend(run(model))
    return changes
