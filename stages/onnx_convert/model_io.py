"""Read an ONNX file and check it, turning every way it can be broken into one InvalidModelError."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from pipeline.errors import InvalidModelError
from stages.onnx_convert.model_checks import check_opset

# Protobuf cannot hold a message over 2 GB; below this size (headroom for the graph beside the weights) a model is
# serialised whole, above it its weights go to an external-data file. The one threshold every reader and writer uses.
PROTOBUF_LIMIT = 2**31 - 2**24


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    return model.ByteSize() < PROTOBUF_LIMIT


def save_model(model: onnx.ModelProto, path: str | os.PathLike, final_name: str | None = None) -> None:
    """Write `model` to `path`; a model too big for protobuf keeps its weights in `<final_name>.data` beside it
    (`final_name`: the file's name once renamed into place, default `path`'s)."""
    path = Path(path)
    if fits_in_protobuf(model):
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{final_name or path.name}.data", size_threshold=1024)


def load_model(path: str | os.PathLike, *, external_data: bool = True) -> onnx.ModelProto:
    """`onnx.load` with one InvalidModelError for a file that is not a readable model (no checker run)."""
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError… for a bad file
        raise InvalidModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def load_checked(path: str | os.PathLike) -> onnx.ModelProto:
    """Load `path` (external data too) and run `onnx.checker`; one clear error for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"{path}: no such file; give the path of an .onnx model")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: the file is empty; export the model again")
    check_external_data(path)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeWarning, ValueError, OSError, RuntimeError, onnx.checker.ValidationError) as e:
        raise InvalidModelError(f"{path}: not a readable ONNX model (truncated or corrupt?): {_one_line(e)}") from None
    if not model.graph.node or not model.opset_import:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph nodes or no opset); is this the right file?")
    check_opset(model)  # before the checker, which reports a too-new opset as an unknown attribute or operator
    try:
        # full_check runs shape inference too; a model over 2 GB must be checked by path
        if fits_in_protobuf(model):
            onnx.checker.check_model(model, full_check=False)
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise InvalidModelError(f"{path}: fails onnx.checker: {_one_line(e)}") from None
    return model


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """The external-data locations the initializers of `model` (loaded without them) refer to, in order."""
    seen: dict[str, None] = {}
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            seen.setdefault(ExternalDataInfo(tensor).location, None)
    return list(seen)


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX model on disk: the .onnx file and every external-data file it refers to."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    extra = sum((path.parent / loc).stat().st_size for loc in external_data_files(model)
                if (path.parent / loc).is_file())
    return path.stat().st_size + extra


def check_external_data(path: Path) -> None:
    """InvalidModelError naming the first external-data file the model needs that is not beside it."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError, RuntimeError):
        return  # load_checked reports the unreadable file
    for location in external_data_files(model):
        data = path.parent / location
        if not data.is_file():
            raise InvalidModelError(f"{path}: its weights are stored in the external data file {location!r}, which "
                                    f"is not in {path.parent.resolve()}; copy it there beside the model")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")
