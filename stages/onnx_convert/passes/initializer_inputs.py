"""Initializers also listed as graph inputs (IR < 4 requires it; some tools keep doing it).

For IR >= 4 they are dropped from the inputs (nothing feeds them); for IR < 4 they stay listed (the
checker requires it) and every reader uses `real_inputs`, as onnx2torch does internally."""

from __future__ import annotations

import onnx

from stages.onnx_convert.passes._graph import real_inputs


def run(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    listed = [i.name for i in graph.input if i.name in inits]
    if not listed:
        return []
    if model.ir_version < 4:
        return [f"{len(listed)} initializers are also graph inputs (IR {model.ir_version}); "
                f"the real inputs are {[i.name for i in real_inputs(graph)]}"]
    keep = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(keep)
    return [f"removed {len(listed)} initializers from the graph inputs (they are not fed at run time)"]
