"""Export: sparse vs dense storage (chosen per tensor, proven by a round trip), provenance, checked copy
errors, external data, and apply-masks without training."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx_corpus import build

from pipeline.errors import BadInputError
from stages.compute_masks import compute_masks_stage
from stages.export_onnx import export_onnx
from stages.import_onnx import import_onnx
from stages.onnx_convert import model_io, runtime
from stages.onnx_convert.mask_file import load_masks
from stages.onnx_convert.sparse_storage import sparse_initializer_bytes
from stages.onnx_convert.to_torch import load_module


@pytest.fixture(scope="session")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_export")
    return import_onnx(build("mlp_wide", d), d / "run")


def _masks(imported, tmp_path, density):
    return compute_masks_stage(imported.normalized_path, tmp_path / f"masks_{density}.npz", method="random",
                               density=density, seed=0).masks_path


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01])
def test_sparse_storage_is_chosen_per_tensor_and_round_trips(imported, tmp_path, density):
    masks = _masks(imported, tmp_path, density)
    r = export_onnx(imported.normalized_path, None, tmp_path / "s.onnx", masks_path=masks, storage="sparse",
                    provenance={"method": "random", "sparsity": 1 - density})
    model = onnx.load(str(r.out_path))
    onnx.checker.check_model(model)
    assert len(model.graph.sparse_initializer) == len(r.sparse_initializers)
    assert r.size_bytes == r.sparse_size_bytes and r.gzip_bytes == r.sparse_gzip_bytes
    if density == 0.5:  # int64 indices: sparse loses below ~2/3 sparsity, so nothing is stored sparse
        assert r.sparse_initializers == () and r.sparse_size_bytes == r.dense_size_bytes
    else:
        assert len(r.sparse_initializers) > 0 and r.sparse_size_bytes < r.dense_size_bytes
    if density == 0.01:
        assert r.sparse_size_bytes < 0.2 * r.dense_size_bytes
    dense = export_onnx(imported.normalized_path, None, tmp_path / "d.onnx", masks_path=masks, storage="dense",
                        provenance={})
    assert dense.size_bytes == dense.dense_size_bytes
    x = np.random.default_rng(0).normal(size=(2, *imported.input_shape)).astype(np.float32)
    y_sparse = runtime.run(runtime.session(r.out_path), x)
    y_dense = runtime.run(runtime.session(dense.out_path), x)
    np.testing.assert_array_equal(y_sparse, y_dense)


def test_provenance_metadata_and_doc_strings_are_kept(imported, tmp_path):
    source = onnx.load(str(imported.normalized_path))
    source.doc_string = "user docs"
    source.metadata_props.add(key="author", value="someone")
    src = tmp_path / "with_meta.onnx"
    onnx.save(source, str(src))
    r = export_onnx(src, None, tmp_path / "out.onnx", provenance={"method": "force", "sparsity": 0.9,
                                                                     "source_sha256": "abc"})
    out = onnx.load(str(r.out_path))
    meta = {p.key: p.value for p in out.metadata_props}
    assert out.doc_string == "user docs" and meta["author"] == "someone"
    assert meta["force_compress.method"] == "force" and meta["force_compress.sparsity"] == "0.9"
    assert meta["force_compress.source_sha256"] == "abc" and meta["force_compress.tool"].startswith("force-compress")
    assert out.ir_version == source.ir_version and list(out.opset_import) == list(source.opset_import)


def test_state_dict_of_another_model_is_refused_and_nothing_written(imported, tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(BadInputError, match="does not belong"):
        export_onnx(imported.normalized_path, tmp_path / "other.pt", tmp_path / "out.onnx", provenance={})
    assert not (tmp_path / "out.onnx").exists()
    assert not list(tmp_path.glob(".out.onnx*"))


def test_masks_are_forced_even_when_the_state_dict_has_values_there(imported, tmp_path):
    masks = _masks(imported, tmp_path, 0.1)
    module, pm = load_module(imported.normalized_path)  # dense values: the mask must zero them
    torch.save(module.state_dict(), tmp_path / "dense.pt")
    r = export_onnx(imported.normalized_path, tmp_path / "dense.pt", tmp_path / "out.onnx", masks_path=masks,
                    provenance={})
    assert r.zeros_forced > 0 and r.density <= 0.1 + 1e-6
    values = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(r.out_path)).graph.initializer}
    maskset = load_masks(masks, pm)
    for name, mask in maskset.items():
        onnx_mask = pm.mask_to_onnx(name, mask)
        assert np.all(values[pm.to_initializer(name)][~onnx_mask] == 0.0)


def test_large_models_use_external_data(imported, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1024)  # stands in for protobuf's 2 GB
    r = export_onnx(imported.normalized_path, None, tmp_path / "big.onnx", provenance={})
    assert r.external_data and (tmp_path / "big.onnx.data").exists()
    x = np.zeros((1, *imported.input_shape), np.float32)
    runtime.run(runtime.session(r.out_path), x)


def test_sparse_initializer_bytes_for_validation_reports(imported, tmp_path):
    masks = _masks(imported, tmp_path, 0.01)
    r = export_onnx(imported.normalized_path, None, tmp_path / "d.onnx", masks_path=masks, provenance={})
    data = sparse_initializer_bytes(onnx.load(str(r.out_path)))
    assert len(data) < r.dense_size_bytes and onnx.load_from_string(data).graph.sparse_initializer
