"""Bundles: the one directory an inspection station needs (graphs, reference arrays, thresholds).

A bundle is `manifest.json` plus the files it lists. Every listed file carries a sha256 so a
station refuses a bundle that was truncated, tampered with or half-copied instead of scoring
parts with it. Arrays are `.npy` saved and loaded with `allow_pickle=False`: nothing in a bundle
is ever unpickled, so a bundle from a USB stick cannot run code.

Writes are crash-safe: `BundleWriter` fills a hidden temporary directory next to the target (same
filesystem), writes the manifest last, then renames the directory into place. A directory
without `manifest.json` is never accepted by `Bundle.load`.

This module must stay importable without torch (the station has none); `onnx` is only imported
when a graph's inputs/outputs have to be read from the file.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from iadgpt.errors import BundleError
from iadgpt.staging import make_staging_dir, release

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
GRAPHS_DIR = "graphs"
REFERENCES_DIR = "references"
ENGINES_DIR = "engines"
_CHUNK = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_VERSION_PACKAGES = ("iadgpt", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch",
                     "tensorrt", "opencv-python-headless")
_REEXPORT = "re-export it with `iadgpt export`"
# Reference arrays holding a trained decoder's tensors (rebuilt by the torch backends; never scorer inputs).
DECODER_ARRAY_PREFIX = "decoder."
_MUTABLE_SECTIONS = ("thresholds", "engines", "scorer", "extra")

PathLike = Union[str, os.PathLike]
Dim = Union[int, str, None]


@dataclass(frozen=True)
class TensorInfo:
    """Name, numpy dtype name and shape (int, symbolic str or None per dim) of a graph I/O."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_any(cls, value: Union["TensorInfo", Mapping[str, Any]]) -> "TensorInfo":
        if isinstance(value, TensorInfo):
            return value
        try:
            dtype = np.dtype(value["dtype"]).name
        except TypeError:  # bfloat16/float8 etc. have no plain numpy dtype: keep the ONNX name
            dtype = str(value["dtype"])
        return cls(str(value["name"]), dtype, tuple(value.get("shape") or ()))


RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest")  # what runtime/preprocess.py implements


@dataclass(frozen=True)
class InputSpec:
    """How frames are turned into the backbone's input; `size` is (height, width).

    `resize` is the OpenCV interpolation used to stretch the whole frame to `size` ("area" keeps
    small defects from aliasing away when a large frame is shrunk). mean/std are in 0..255 units
    and are applied inside the encoder graph, not by the station.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "area"
    color: str = "rgb"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InputSpec":
        size = data["size"]
        hw = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        mean, std = tuple(float(m) for m in data["mean"]), tuple(float(s) for s in data["std"])
        if min(hw) < 1 or not all(math.isfinite(v) for v in mean + std) or 0.0 in std:
            raise ValueError(f"size {list(hw)} must be positive, mean {list(mean)} and std {list(std)} finite, "
                             "std not 0")
        resize, color = data.get("resize", "area"), data.get("color", "rgb")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize {resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if color != "rgb":  # every frame is made RGB before the encoder: another order would be ignored
            raise ValueError(f"color {color!r}: this runtime feeds encoders RGB only")
        return cls(hw, mean, std, resize, color)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --------------------------------------------------------------------------- helpers


def _check_scorer(scorer: Mapping[str, Any], references: Mapping[str, Any], where: str) -> None:
    """The scorer fields engines rebuild the scorer from: a hand-edited value is refused here, at load,
    rather than as a traceback in one backend and silently accepted by another."""
    def fail(key: str, want: str) -> None:
        raise BundleError(f"{where}: scorer.{key} must be {want}, got {scorer[key]!r}; {_REEXPORT}")

    def number(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    def whole(value: Any, lo: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= lo

    if "kind" in scorer and not isinstance(scorer["kind"], str):
        fail("kind", "a string")
    if scorer.get("shots") is not None and not whole(scorer["shots"], 0):
        fail("shots", "a whole number >= 0 (0 = all images)")
    if scorer.get("coreset") is not None and not (number(scorer["coreset"]) and 0 < scorer["coreset"] <= 1):
        fail("coreset", "null or a fraction in (0, 1]")
    if "grid_stride" in scorer and not whole(scorer["grid_stride"], 1):
        fail("grid_stride", "a whole number >= 1")
    for key in ("sigma", "logit_scale"):
        if key in scorer and not (number(scorer[key]) and scorer[key] >= 0):
            fail(key, "a finite number >= 0")
    if "image_size" in scorer:
        size = scorer["image_size"]
        if not (isinstance(size, list) and len(size) == 2 and all(whole(v, 1) for v in size)):
            fail("image_size", "[height, width] in pixels")
    refs = scorer.get("references", {})
    if not isinstance(refs, dict) or not all(isinstance(v, str) and v in references for v in refs.values()):
        raise BundleError(f"{where}: scorer.references must map scorer inputs to arrays listed under "
                          f"`references` ({sorted(references)}), got {refs!r}; {_REEXPORT}")


def sha256_file(path: PathLike, chunk_size: int = _CHUNK) -> str:
    """sha256 of a file, read in chunks so multi-GB external weights do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def package_versions(names: Iterable[str] = _VERSION_PACKAGES) -> dict[str, str]:
    """Versions of the packages present now (absent ones are left out, not guessed)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_and_hash(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            block = fi.read(_CHUNK)
            if not block:
                break
            h.update(block)
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()


def _write_bytes(dst: Path, data: bytes) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, PurePosixPath)):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dump_manifest(manifest: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(manifest, indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle manifest cannot be written as strict JSON ({exc}); pass plain "
                          "numbers/strings/lists/dicts without NaN or inf") from exc
    return (text + "\n").encode("utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shareable(path: PathLike, directory: bool = False) -> None:
    """Give a file made by `tempfile` (always 0600/0700) the modes the umask allows, as open() and
    mkdir() would: a station service running as another user must be able to read the bundle."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_atomic(path: Path, data: Any) -> None:
    """Write `data` (bytes or any buffer) via temp file + fsync + os.replace, so readers (and a power
    cut) see the old or the new file, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        shareable(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BundleError(f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.' "
                          "(it becomes a file name inside the bundle)")
    return name


def _safe_relpath(rel: str, where: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or "\\" in rel or any(part in ("", ".", "..") for part in p.parts):
        raise BundleError(f"{where}: file path {rel!r} must be relative and stay inside the bundle; "
                          f"the manifest is corrupt or hand-edited, {_REEXPORT}")
    return p


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _onnx_io(model_bytes_or_path: Union[bytes, Path]) -> tuple[Any, list[TensorInfo], list[TensorInfo]]:
    """Read graph inputs/outputs (initialisers excluded) without loading external weights."""
    try:
        import onnx
    except ImportError as exc:
        raise BundleError("reading graph inputs/outputs needs the `onnx` package: "
                          "`pip install iadgpt[export]` (or add the graph as bytes with inputs=/outputs= given)") from exc
    try:
        if isinstance(model_bytes_or_path, bytes):
            model = onnx.load_model_from_string(model_bytes_or_path)
        else:
            model = onnx.load(str(model_bytes_or_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise BundleError(f"cannot parse ONNX graph {model_bytes_or_path if isinstance(model_bytes_or_path, Path) else '<bytes>'}: "
                          f"{exc}; {_REEXPORT}") from exc

    def info(value_info: Any) -> TensorInfo:
        tt = value_info.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        except Exception:  # bfloat16/float8 have no plain numpy dtype
            dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(str(d.dim_param))
            else:
                dims.append(None)
        return TensorInfo(value_info.name, dtype, tuple(dims))

    inits = {i.name for i in model.graph.initializer}
    inputs = [info(v) for v in model.graph.input if v.name not in inits]
    outputs = [info(v) for v in model.graph.output]
    return model, inputs, outputs


def _external_locations(model: Any) -> list[str]:
    """Relative locations of external-data files referenced by initialisers (deduplicated)."""
    import onnx

    locations: list[str] = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in locations:
                locations.append(entry.value)
    return locations


def _new_manifest() -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "backbone": {},
        "graphs": {},
        "references": {},
        "thresholds": {},
        "engines": {},
        "scorer": {},
        "created": "",
        "versions": {},
        "extra": {},
    }


# --------------------------------------------------------------------------- writer


class BundleWriter:
    """Builds a bundle in a hidden temp dir next to `path` and renames it into place on success.

    Use as a context manager: an exception inside the block discards everything written and
    leaves any existing bundle at `path` untouched::

        with BundleWriter(out, backbone={...}) as w:
            w.add_graph("encoder", "encoder.onnx")
            w.add_array("memory_bank", bank, provenance={"images_sha256": ...})
        bundle = w.bundle
    """

    def __init__(self, path: PathLike, *, backbone: Optional[Mapping[str, Any]] = None,
                 scorer: Optional[Mapping[str, Any]] = None,
                 thresholds: Optional[Mapping[str, Any]] = None,
                 extra: Optional[Mapping[str, Any]] = None, overwrite: bool = True) -> None:
        self.path = Path(path).absolute()
        self.overwrite = overwrite
        self.manifest = _new_manifest()
        if backbone is not None:
            self.manifest["backbone"] = dict(backbone)
        if scorer is not None:
            self.set_scorer(scorer)
        if thresholds is not None:
            self.set_thresholds(thresholds)
        if extra is not None:
            self.set_extra(extra)
        self._check_target()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = make_staging_dir(self.path.parent, f".{self.path.name}.tmp-")
        shareable(self.tmp_dir, directory=True)
        self._files: set[str] = set()
        self._done = False
        self.bundle: Optional[Bundle] = None

    # -- context manager
    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _check_target(self) -> None:
        check_bundle_target(self.path, self.overwrite)

    def _require_open(self) -> None:
        if self._done:
            raise BundleError(f"bundle writer for {self.path} is already committed or aborted")

    def _claim(self, rel: str) -> Path:
        _safe_relpath(rel, f"bundle {self.path}")
        if rel in self._files or rel == MANIFEST_NAME:
            raise BundleError(f"two entries of bundle {self.path} want the file {rel!r}; "
                              "give the graphs/arrays distinct names (or distinct external-data file names)")
        self._files.add(rel)
        return self.tmp_dir / rel

    # -- content
    def set_backbone(self, name: str, input_spec: Union[InputSpec, Mapping[str, Any]],
                     layers: Sequence[Any] = (), dims: Sequence[int] = (),
                     strides: Sequence[int] = ()) -> None:
        spec = input_spec.to_dict() if isinstance(input_spec, InputSpec) else dict(input_spec)
        self.manifest["backbone"] = {"name": name, "input_spec": spec, "layers": list(layers),
                                     "dims": [int(d) for d in dims], "strides": [int(s) for s in strides]}

    def set_thresholds(self, thresholds: Mapping[str, Any]) -> None:
        self.manifest["thresholds"] = dict(thresholds)

    def set_scorer(self, config: Mapping[str, Any]) -> None:
        self.manifest["scorer"] = dict(config)

    def set_extra(self, extra: Mapping[str, Any]) -> None:
        self.manifest["extra"] = dict(extra)

    def add_graph(self, role: str, onnx_model: Union[PathLike, bytes], *,
                  inputs: Optional[Sequence[Union[TensorInfo, Mapping[str, Any]]]] = None,
                  outputs: Optional[Sequence[Union[TensorInfo, Mapping[str, Any]]]] = None,
                  precision: str = "fp32", file: Optional[str] = None) -> dict[str, Any]:
        """Copy an ONNX graph (and its external-data files) in as `graphs/<role>.onnx`.

        Inputs/outputs are read from the graph with `onnx` unless both are given explicitly.
        External data is only supported from a path (its files sit next to the .onnx).
        """
        self._require_open()
        _check_name("graph role", role)
        if role in self.manifest["graphs"]:
            raise BundleError(f"graph role {role!r} added twice to bundle {self.path}")
        fname = _check_name("graph file", file or f"{role}.onnx")
        from_bytes = isinstance(onnx_model, (bytes, bytearray, memoryview))
        src = None if from_bytes else Path(onnx_model)  # type: ignore[arg-type]
        if src is not None and not src.is_file():
            raise BundleError(f"ONNX graph {src} does not exist; export it first with `iadgpt export`")

        locations: list[str] = []
        need_io = inputs is None or outputs is None
        if need_io or src is not None:
            model, read_in, read_out = _onnx_io(bytes(onnx_model) if from_bytes else src)  # type: ignore[arg-type]
            locations = _external_locations(model)
            inputs = read_in if inputs is None else inputs
            outputs = read_out if outputs is None else outputs
            del model
        if locations and from_bytes:
            raise BundleError(f"graph {role!r} references external data {locations} but was given as bytes; "
                              "pass the .onnx path so the weight files can be copied and hashed")

        entry: dict[str, Any] = {"file": f"{GRAPHS_DIR}/{fname}", "precision": str(precision)}
        dst = self._claim(entry["file"])
        entry["sha256"] = (_write_bytes(dst, bytes(onnx_model)) if from_bytes  # type: ignore[arg-type]
                           else _copy_and_hash(src, dst))  # type: ignore[arg-type]
        externals = []
        for loc in locations:
            rel = _safe_relpath(loc, f"graph {src}")
            ext_src = src.parent / rel  # type: ignore[union-attr]
            if not ext_src.is_file():
                raise BundleError(f"external data file {ext_src} of graph {src} is missing; "
                                  "keep it next to the .onnx file or re-export the graph")
            rel_in_bundle = f"{GRAPHS_DIR}/{rel.as_posix()}"
            sha = _copy_and_hash(ext_src, self._claim(rel_in_bundle))
            externals.append({"file": rel_in_bundle, "sha256": sha})
        entry["external_data"] = externals
        entry["inputs"] = [TensorInfo.from_any(t).to_dict() for t in inputs]  # type: ignore[union-attr]
        entry["outputs"] = [TensorInfo.from_any(t).to_dict() for t in outputs]  # type: ignore[union-attr]
        self.manifest["graphs"][role] = entry
        log.debug("bundle %s: added graph %s (%s)", self.path, role, entry["file"])
        return copy.deepcopy(entry)

    def copy_graph(self, role: str, src: "Bundle", src_role: str, precision: str) -> dict[str, Any]:
        """Copy graph `src_role` of another (verified) bundle in as `role`, with the inputs, outputs and
        external data its manifest lists: no `onnx` needed, so a station install can rewrite a bundle."""
        self._require_open()
        _check_name("graph role", role)
        if role in self.manifest["graphs"]:
            raise BundleError(f"graph role {role!r} added twice to bundle {self.path}")
        known = src.graphs[src_role]
        entry: dict[str, Any] = {"file": f"{GRAPHS_DIR}/{_check_name('graph file', f'{role}.onnx')}",
                                 "precision": str(precision)}
        entry["sha256"] = _copy_and_hash(src.path / known["file"], self._claim(entry["file"]))
        externals = []
        for ext in known.get("external_data", []):  # their names are inside the graph: keep them
            externals.append({"file": ext["file"],
                              "sha256": _copy_and_hash(src.path / ext["file"], self._claim(ext["file"]))})
        entry.update(external_data=externals, inputs=copy.deepcopy(known["inputs"]),
                     outputs=copy.deepcopy(known["outputs"]))
        self.manifest["graphs"][role] = entry
        return copy.deepcopy(entry)

    def add_array(self, name: str, array: np.ndarray, *,
                  provenance: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """Save a reference array as `references/<name>.npy` (never pickled)."""
        self._require_open()
        _check_name("reference", name)
        if name in self.manifest["references"]:
            raise BundleError(f"reference {name!r} added twice to bundle {self.path}")
        arr = np.asarray(array)
        if arr.dtype.hasobject:
            raise BundleError(f"reference {name!r} has dtype object, which would need pickle; "
                              "convert it to a numeric array")
        if arr.size == 0:
            raise BundleError(f"reference {name!r} is empty (shape {arr.shape}): a bank needs at least one "
                              "normal patch; check the images it was built from")
        rel = f"{REFERENCES_DIR}/{name}.npy"
        dst = self._claim(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        dtype_name = arr.dtype.name if np.dtype(arr.dtype.name) == arr.dtype else arr.dtype.str
        entry = {"file": rel, "sha256": sha256_file(dst), "dtype": dtype_name,
                 "shape": [int(s) for s in arr.shape], "provenance": dict(provenance or {})}
        self.manifest["references"][name] = entry
        return copy.deepcopy(entry)

    # -- finish
    def abort(self) -> None:
        """Discard the temp directory; an existing bundle at `path` is untouched."""
        if self._done:
            return
        self._done = True
        release(self.tmp_dir)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        log.info("bundle write to %s aborted; nothing was changed", self.path)

    def commit(self) -> "Bundle":
        """Write the manifest last, then swap the directory into place."""
        self._require_open()
        try:
            self.manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.manifest["versions"] = package_versions()
            for section in ("backbone", "scorer", "thresholds", "extra"):
                self.manifest[section] = json.loads(_dump_manifest(self.manifest[section]))
            write_atomic(self.tmp_dir / MANIFEST_NAME, _dump_manifest(self.manifest))
            _fsync_dir(self.tmp_dir)
            self._swap_into_place()
        except BaseException:
            self.abort()
            raise
        self._done = True
        release(self.tmp_dir)  # the folder is the bundle now: its build lock goes
        self.bundle = Bundle.load(self.path, verify=False)
        log.info("wrote bundle %s (%d graphs, %d references)", self.path,
                 len(self.manifest["graphs"]), len(self.manifest["references"]))
        return self.bundle

    def _swap_into_place(self) -> None:
        self._check_target()
        swap_into_place(self.tmp_dir, self.path)


def check_bundle_target(path: PathLike, overwrite: bool = True) -> None:
    """Refuse, before any work, a bundle path that can never be written: a file, a folder that is
    not a bundle, an existing bundle without `overwrite`, or a parent this user cannot write."""
    p = Path(path).absolute()
    if p.exists():
        if not p.is_dir():
            raise BundleError(f"{p} exists and is not a directory; choose another bundle path")
        if not overwrite:
            raise BundleError(f"bundle {p} already exists; remove it or pass overwrite=True")
        if not (p / MANIFEST_NAME).is_file() and any(p.iterdir()):
            raise BundleError(f"{p} exists, is not empty and is not a bundle (no {MANIFEST_NAME}); "
                              "refusing to replace it: choose another path or remove it yourself")
    parent = next((a for a in p.parents if a.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write bundle {p}: {parent} is not a folder this user can write to; "
                          "choose another path")


def swap_into_place(staged: Path, target: Path) -> None:
    """Rename the finished folder `staged` to `target` (same file system), replacing what is there:
    readers see the old bundle or the new one, and a failure puts the old one back."""
    if not target.exists():
        os.rename(staged, target)
    else:
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


# --------------------------------------------------------------------------- reader


class Bundle:
    """A loaded, verified bundle. Read-only except for `update_manifest`/`add_engine`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self._manifest = manifest

    # -- construction
    @classmethod
    def create(cls, path: PathLike, *, backbone: Optional[Mapping[str, Any]] = None,
               graphs: Optional[Mapping[str, Union[PathLike, bytes]]] = None,
               references: Optional[Mapping[str, np.ndarray]] = None,
               thresholds: Optional[Mapping[str, Any]] = None,
               scorer: Optional[Mapping[str, Any]] = None,
               extra: Optional[Mapping[str, Any]] = None,
               precision: str = "fp32", overwrite: bool = True) -> "Bundle":
        """One-call form of `BundleWriter` for graphs whose I/O can be read from the ONNX."""
        with BundleWriter(path, backbone=backbone, scorer=scorer, thresholds=thresholds,
                          extra=extra, overwrite=overwrite) as w:
            for role, model in (graphs or {}).items():
                w.add_graph(role, model, precision=precision)
            for name, arr in (references or {}).items():
                w.add_array(name, arr)
        assert w.bundle is not None
        return w.bundle

    @classmethod
    def load(cls, path: PathLike, verify: bool = True) -> "Bundle":
        """Read the manifest and (by default) check every listed file's presence and sha256."""
        root = Path(path).absolute()
        manifest = _read_manifest(root)
        bundle = cls(root, manifest)
        bundle._validate_structure()
        if verify:
            bundle.verify()
        return bundle

    # -- manifest access
    @property
    def manifest(self) -> dict[str, Any]:
        """A deep copy: mutate it and nothing happens; use `update_manifest` to change a bundle."""
        return copy.deepcopy(self._manifest)

    @property
    def schema_version(self) -> int:
        return int(self._manifest["schema_version"])

    @property
    def backbone(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest.get("backbone") or {})

    @property
    def input_spec(self) -> InputSpec:
        spec = (self._manifest.get("backbone") or {}).get("input_spec")
        if not spec:
            raise BundleError(f"bundle {self.path} has no backbone.input_spec in {MANIFEST_NAME}; {_REEXPORT}")
        try:
            return InputSpec.from_dict(spec)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"bundle {self.path}: backbone.input_spec is malformed ({exc}); {_REEXPORT}") from exc

    @property
    def graphs(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest["graphs"])

    @property
    def float_encoder_role(self) -> str:
        """The encoder graph in float: "encoder", or "encoder_fp32" once `iadgpt calibrate --int8` made
        "encoder" an INT8 graph (TensorRT fp16 builds and the torch rebuild's parity check read it)."""
        return "encoder_fp32" if "encoder_fp32" in self._manifest["graphs"] else "encoder"

    @property
    def references(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest["references"])

    @property
    def thresholds(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest["thresholds"])

    @property
    def engines(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest["engines"])

    @property
    def scorer(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest["scorer"])

    @property
    def extra(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest["extra"])

    def graph_path(self, role: str) -> Path:
        entry = self._manifest["graphs"].get(role)
        if entry is None:
            raise BundleError(f"bundle {self.path} has no graph {role!r} (it has: "
                              f"{', '.join(sorted(self._manifest['graphs'])) or 'none'}); {_REEXPORT}")
        return self._resolve(entry["file"], f"graph {role!r}")

    def graph_io(self, role: str) -> tuple[list[TensorInfo], list[TensorInfo]]:
        self.graph_path(role)
        entry = self._manifest["graphs"][role]
        return ([TensorInfo.from_any(t) for t in entry.get("inputs", [])],
                [TensorInfo.from_any(t) for t in entry.get("outputs", [])])

    def engine_path(self, key: str) -> Path:
        entry = self._manifest["engines"].get(key)
        if entry is None:
            raise BundleError(f"bundle {self.path} has no engine {key!r}; build one with "
                              f"`iadgpt build {self.path} --precision fp16`")
        return self._resolve(entry["file"], f"engine {key!r}")

    def array(self, name: str, mmap: bool = False) -> np.ndarray:
        """Load a reference array with `allow_pickle=False`; dtype/shape must match the manifest."""
        entry = self._manifest["references"].get(name)
        if entry is None:
            raise BundleError(f"bundle {self.path} has no reference array {name!r} (it has: "
                              f"{', '.join(sorted(self._manifest['references'])) or 'none'}); {_REEXPORT}")
        path = self._resolve(entry["file"], f"reference {name!r}")
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (ValueError, OSError, EOFError) as exc:
            raise BundleError(f"reference {entry['file']} in bundle {self.path} cannot be read as a plain "
                              f"numeric .npy ({exc}); restore the bundle from its source or {_REEXPORT}") from exc
        _check_array_meta(arr.dtype, arr.shape, entry, path, self.path)
        return arr

    # -- integrity
    def listed_files(self) -> list[tuple[str, str, str]]:
        """(relative file, sha256, what) for every file the manifest lists."""
        out: list[tuple[str, str, str]] = []
        for role, g in self._manifest["graphs"].items():
            out.append((g["file"], g["sha256"], f"graph {role!r}"))
            for ext in g.get("external_data", []):
                out.append((ext["file"], ext["sha256"], f"external data of graph {role!r}"))
        for name, r in self._manifest["references"].items():
            out.append((r["file"], r["sha256"], f"reference {name!r}"))
        for key, e in self._manifest["engines"].items():
            out.append((e["file"], e["sha256"], f"engine {key!r}"))
        return out

    def verify(self) -> None:
        """Check every listed file exists and matches its sha256; arrays must be pickle-free .npy."""
        for rel, sha, what in self.listed_files():
            path = self._resolve(rel, what)
            if not path.is_file():
                raise BundleError(f"bundle {self.path} is incomplete: {rel} ({what}) is missing; "
                                  f"restore the bundle from its source or {_REEXPORT}")
            actual = sha256_file(path)
            if actual != sha:
                fix = (f"rebuild it with `iadgpt build {self.path}`" if what.startswith("engine")
                       else f"restore the bundle from its source or {_REEXPORT}")
                raise BundleError(f"bundle {self.path}: {rel} ({what}) is corrupt or was modified "
                                  f"(sha256 {actual[:12]}... != manifest {sha[:12]}...); {fix}")
        for name, entry in self._manifest["references"].items():
            path = self._resolve(entry["file"], f"reference {name!r}")
            dtype, shape = _npy_header(path, self.path)
            _check_array_meta(dtype, shape, entry, path, self.path)

    def _resolve(self, rel: str, what: str) -> Path:
        p = _safe_relpath(rel, f"bundle {self.path}, {what}")
        full = self.path.joinpath(*p.parts)
        root = self.path.resolve()
        try:
            full.resolve().relative_to(root)
        except ValueError:
            raise BundleError(f"bundle {self.path}: {rel} ({what}) points outside the bundle (symlink?); "
                              f"restore the bundle from its source or {_REEXPORT}") from None
        return full

    def _validate_structure(self) -> None:
        m = self._manifest
        where = f"{self.path / MANIFEST_NAME}"
        for section in ("graphs", "references", "engines", "thresholds", "scorer", "extra", "backbone"):
            m.setdefault(section, {})
            if not isinstance(m[section], dict):
                raise BundleError(f"{where}: `{section}` must be an object; {_REEXPORT}")
        for section in ("graphs", "references", "engines"):
            for key, entry in m[section].items():
                if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                        or not isinstance(entry.get("sha256"), str):
                    raise BundleError(f"{where}: {section}.{key} needs `file` and `sha256` strings; {_REEXPORT}")
                _safe_relpath(entry["file"], f"{where}, {section}.{key}")
        for role, g in m["graphs"].items():
            exts = g.setdefault("external_data", [])
            if not isinstance(exts, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str)
                    for e in exts):
                raise BundleError(f"{where}: graphs.{role}.external_data must list {{file, sha256}}; {_REEXPORT}")
        _check_scorer(m["scorer"], m["references"], where)
        for key, entry in m["thresholds"].items():
            value = entry.get("value") if isinstance(entry, dict) else None
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                shown = entry.get("value", "no value") if isinstance(entry, dict) else entry  # not its image hashes
                raise BundleError(f"{where}: thresholds.{key} needs a finite number `value`, got {shown!r}; "
                                  "re-fit it with `iadgpt calibrate BUNDLE --normal DIR`")

    # -- later steps (calibration, engine builds)
    def update_manifest(self, *, thresholds: Optional[Mapping[str, Any]] = None,
                        engines: Optional[Mapping[str, Any]] = None,
                        scorer: Optional[Mapping[str, Any]] = None,
                        extra: Optional[Mapping[str, Any]] = None, replace: bool = False) -> None:
        """Merge (or with `replace=True`, replace) the mutable sections and rewrite manifest.json atomically.

        Re-reads the manifest on disk first so two steps run one after the other do not undo each
        other. Engine entries must name files already inside the bundle; their sha256 is computed
        when missing.
        """
        current = _read_manifest(self.path)
        changes = {"thresholds": thresholds, "engines": engines, "scorer": scorer, "extra": extra}
        for section, value in changes.items():
            if value is None:
                continue
            base = {} if replace else dict(current.get(section) or {})
            base.update(copy.deepcopy(dict(value)))
            current[section] = base
        staged = Bundle(self.path, current)
        staged._validate_structure_engines_fill()
        staged._validate_structure()
        write_atomic(self.path / MANIFEST_NAME, _dump_manifest(current))
        self._manifest = json.loads(_dump_manifest(current))
        log.info("updated %s (%s)", self.path / MANIFEST_NAME,
                 ", ".join(k for k, v in changes.items() if v is not None))

    def _validate_structure_engines_fill(self) -> None:
        for key, entry in (self._manifest.get("engines") or {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise BundleError(f"engine entry {key!r} needs a `file` inside bundle {self.path}")
            path = self._resolve(entry["file"], f"engine {key!r}")
            if not path.is_file():
                raise BundleError(f"engine file {path} is missing; copy it into the bundle first "
                                  "(Bundle.add_engine does this)")
            if not entry.get("sha256"):
                entry["sha256"] = sha256_file(path)

    def add_engine(self, key: str, engine_file: PathLike, *, precision: str, trt_version: str,
                   compute_capability: Union[str, Sequence[int]], **info: Any) -> dict[str, Any]:
        """Copy a built engine into `engines/` (no copy if it is already there) and list it."""
        _check_name("engine key", key)
        src = Path(engine_file).absolute()
        if not src.is_file():
            raise BundleError(f"engine file {src} does not exist; build it with "
                              f"`iadgpt build {self.path} --precision {precision}`")
        dest_dir = self.path / ENGINES_DIR
        dest_dir.mkdir(exist_ok=True)
        dst = dest_dir / _check_name("engine file", src.name)
        if src.resolve() != dst.resolve():
            tmp = dest_dir / f".{src.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                sha = _copy_and_hash(src, tmp)
                os.replace(tmp, dst)
            finally:
                if tmp.exists():
                    tmp.unlink()
            sidecar = src.with_name(src.name + ".json")
            if sidecar.is_file():
                shutil.copyfile(sidecar, dst.with_name(dst.name + ".json"))
            _fsync_dir(dest_dir)
        else:
            sha = sha256_file(dst)
        cc = compute_capability if isinstance(compute_capability, str) else ".".join(str(int(c)) for c in compute_capability)
        entry = {"file": f"{ENGINES_DIR}/{dst.name}", "sha256": sha, "precision": precision,
                 "trt_version": str(trt_version), "compute_capability": cc, **info}
        self.update_manifest(engines={key: entry})
        return copy.deepcopy(entry)

    def __repr__(self) -> str:
        return (f"Bundle({str(self.path)!r}, graphs={sorted(self._manifest['graphs'])}, "
                f"references={sorted(self._manifest['references'])})")


# --------------------------------------------------------------------------- reader helpers


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a directory; export one with `iadgpt export`")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST_NAME} is missing (an interrupted save leaves "
                          f"no manifest); {_REEXPORT}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); restore the bundle from its source or {_REEXPORT}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} must hold a JSON object; {_REEXPORT}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{mpath} has no integer schema_version; {_REEXPORT}")
    if version != SCHEMA_VERSION:
        age = "newer" if version > SCHEMA_VERSION else "older"
        raise BundleError(f"{mpath} was written by a {age} iadgpt (schema {version}; this iadgpt reads "
                          f"schema {SCHEMA_VERSION}); {_REEXPORT}"
                          + (" or upgrade iadgpt on this station" if age == "newer" else ""))
    return manifest


def _npy_header(path: Path, root: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype/shape from the .npy header only (literal parsing, never unpickling)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            major, _minor = fmt.read_magic(f)
            if major == 1:
                shape, _fortran, dtype = fmt.read_array_header_1_0(f)
            elif major in (2, 3):
                shape, _fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {major}")
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise BundleError(f"bundle {root}: {path.name} is not a valid .npy file ({exc}); "
                          f"restore the bundle from its source or {_REEXPORT}") from exc
    return np.dtype(dtype), tuple(shape)


def _check_array_meta(dtype: np.dtype, shape: tuple[int, ...], entry: Mapping[str, Any],
                      path: Path, root: Path) -> None:
    if dtype.hasobject:
        raise BundleError(f"bundle {root}: {path.name} holds Python objects (pickle), which bundles never "
                          f"load; {_REEXPORT}")
    want_dtype = entry.get("dtype")
    want_shape = entry.get("shape")
    try:
        dtype_ok = want_dtype is None or np.dtype(want_dtype) == dtype
    except TypeError:
        dtype_ok = False
    if not dtype_ok:
        raise BundleError(f"bundle {root}: {path.name} has dtype {dtype}, manifest says {want_dtype}; {_REEXPORT}")
    if want_shape is not None and tuple(want_shape) != tuple(shape):
        raise BundleError(f"bundle {root}: {path.name} has shape {tuple(shape)}, manifest says "
                          f"{tuple(want_shape)}; {_REEXPORT}")
    if 0 in shape:  # an empty memory bank scores every frame as infinitely far from normal
        raise BundleError(f"bundle {root}: {path.name} is empty (shape {tuple(shape)}); {_REEXPORT}")
