"""Every corpus model (tests/onnx_corpus.py) goes ONNX -> torch -> ONNX: import with parity, random masks
at 90% sparsity, changed values written back, then onnxruntime runs the file, masked entries are exactly
zero, onnxruntime and torch agree on it, and nodes and interface are those of the normalised graph (and
of the source, less the nodes the import report says it folded, plus those it says it added to read a fixed
batch's size at run time). Unsupported models raise the clear error."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_corpus
import pytest
import torch
from onnx import numpy_helper
from onnx_corpus import CASES

import pipeline.errors
from stages.compute_masks import compute_masks_stage
from stages.export_onnx import export_onnx
from stages.import_onnx import import_onnx
from stages.onnx_convert import runtime
from stages.onnx_convert.mask_file import load_masks
from stages.onnx_convert.passes import dynamic_batch
from stages.onnx_convert.to_torch import load_module

DENSITY = 0.1
FOLDED_OPS = {"Identity", "Constant", "ConstantOfShape"}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_corpus")


def _params():
    for case_id, case in CASES.items():
        marks = [pytest.mark.slow] if case.slow else []
        yield pytest.param(case_id, marks=marks, id=case_id)


def _initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for s in model.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(s.dims)), dtype=numpy_helper.to_array(s.values).dtype)
        dense[numpy_helper.to_array(s.indices).reshape(-1)] = numpy_helper.to_array(s.values)
        values[s.values.name] = dense.reshape(tuple(s.dims))
    return values


def _train_a_little(module: torch.nn.Module, maskset, input_shape, seed: int = 1) -> None:
    """Stand-in for training: new values everywhere (so write-back is tested, transforms included) and
    BatchNorm running statistics updated by a train-mode forward pass; masks applied after."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        module.train()
        module(torch.randn((4, *input_shape), generator=g))
        module.eval()
    maskset.apply(module)


@pytest.mark.parametrize("case_id", list(_params()))
def test_corpus_round_trip(case_id, corpus_dir, tmp_path):
    case = CASES[case_id]
    path = onnx_corpus.build(case_id, corpus_dir)
    if case.error:
        with pytest.raises(getattr(pipeline.errors, case.error), match=case.match):
            import_onnx(path, tmp_path)
        assert not (tmp_path / "normalized.onnx").exists()
        return

    source = onnx.load(str(path))
    imported = import_onnx(path, tmp_path)
    assert imported.parity_max_rel <= 1e-4
    assert imported.n_prunable > 0

    # random masks at 90 % (force_core), keyed by ONNX initializer name
    masks = compute_masks_stage(imported.normalized_path, tmp_path / "masks.npz", method="random",
                                density=DENSITY, seed=0)
    assert masks.density == pytest.approx(DENSITY, abs=1e-3)
    module, param_map = load_module(imported.normalized_path)
    assert all(module.get_parameter(n).requires_grad for n in param_map.prunable)
    maskset = load_masks(masks.masks_path, param_map)
    assert set(maskset) == set(param_map.prunable)
    _train_a_little(module, maskset, imported.input_shape)
    torch.save(module.state_dict(), tmp_path / "trained.pt")

    storage = "sparse" if source.ir_version >= 6 else "dense"
    result = export_onnx(imported.normalized_path, tmp_path / "trained.pt", tmp_path / "out.onnx",
                         masks_path=masks.masks_path, storage=storage, provenance={"method": "random", "sparsity": 0.9})
    exported = onnx.load(str(result.out_path))
    normalized = onnx.load(str(imported.normalized_path))
    onnx.checker.check_model(exported)

    # masked entries exactly zero, kept ones as trained
    values = _initializer_values(exported)
    with np.load(masks.masks_path) as npz:
        for name in npz.files:
            mask = npz[name]
            assert np.all(values[name][~mask] == 0.0) and not np.any(np.signbit(values[name][~mask]))
    assert result.density <= DENSITY + 1e-3

    # onnxruntime runs it and agrees with torch
    x = torch.randn((3, *imported.input_shape), generator=torch.Generator().manual_seed(5))
    y_ort = runtime.run(runtime.session(result.out_path), x.numpy())
    with torch.no_grad():
        y_torch = module.eval()(x)
    y_torch = (y_torch[0] if isinstance(y_torch, (tuple, list)) else y_torch).numpy()
    assert np.max(np.abs(y_ort - y_torch)) <= 1e-4 * max(1.0, float(np.max(np.abs(y_ort))))

    # nodes, interface, opset and IR version are those of the normalised graph ...
    assert [n.SerializeToString() for n in exported.graph.node] == [
        n.SerializeToString() for n in normalized.graph.node]
    assert [i.name for i in exported.graph.input] == [i.name for i in normalized.graph.input]
    assert [o.SerializeToString() for o in exported.graph.output] == [
        o.SerializeToString() for o in normalized.graph.output]
    assert list(exported.opset_import) == list(source.opset_import)
    assert exported.ir_version == source.ir_version
    assert {p.key for p in exported.metadata_props} >= {p.key for p in source.metadata_props}
    assert "force_compress.method" in {p.key for p in exported.metadata_props}
    # ... which are the source's, less the constant nodes the import folded into initializers, plus the nodes that
    # read the batch size at run time where a fixed batch was broadcast (named batch/…, said in the report)
    added = [n.name for n in exported.graph.node if n.name.startswith(dynamic_batch.ADDED)]
    assert bool(added) == any("at run time" in c for c in imported.changes)
    kept = [(n.op_type, n.name) for n in source.graph.node if n.op_type not in FOLDED_OPS]
    assert [(n.op_type, n.name) for n in exported.graph.node
            if n.op_type not in FOLDED_OPS and n.name not in added] == kept
    assert [o.name for o in exported.graph.output] == [o.name for o in source.graph.output]


@pytest.mark.parametrize("case_id", [p for p in _params() if CASES[p.values[0]].error is None])
def test_corpus_channel_cut(case_id, corpus_dir, tmp_path):
    """`--structure channel` on every corpus model: random channel masks, then the cut proven against the masked
    model under onnxruntime; or, where nothing can be cut, one clear line (exit 2), before anything is written."""
    from stages.cut_channels import cut_graph
    from stages.onnx_convert.passes._graph import real_inputs

    path = onnx_corpus.build(case_id, corpus_dir)
    imported = import_onnx(path, tmp_path, train_norm=True)
    try:
        masks = compute_masks_stage(imported.normalized_path, tmp_path / "masks.npz", method="random", density=0.7,
                                    structure="channel", channel_multiple=1, device="cpu")  # the surgery, any count
    except pipeline.errors.BadInputError as e:
        message = str(e)
        assert "\n" not in message and ("no channel that can be pruned" in message or "largest reachable" in message)
        assert not (tmp_path / "masks.npz").exists()
        return
    x = np.random.default_rng(0).standard_normal((4, *imported.input_shape)).astype(np.float32)
    cut = cut_graph(imported.normalized_path, masks.masks_path, tmp_path, images=x)
    assert cut.parity_max_rel <= 1e-4
    assert cut.costs_after["prunable_weights"] < cut.costs_before["prunable_weights"]
    model = onnx.load(str(cut.cut_path))
    onnx.checker.check_model(model)
    source = onnx.load(str(imported.normalized_path))
    # the interface: inputs fed at run time (IR < 4 also lists every initializer, a copied Reshape target too)
    assert [i.name for i in real_inputs(model.graph)] == [i.name for i in real_inputs(source.graph)]
    assert [o.name for o in model.graph.output] == [o.name for o in source.graph.output]
