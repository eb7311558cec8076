"""Bundle round trip, integrity checks, crash safety and the no-pickle guarantee."""
from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from iadgpt.bundle import (  # noqa: E402
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Bundle,
    BundleWriter,
    InputSpec,
    TensorInfo,
    check_bundle_target,
    sha256_file,
)
from iadgpt.runtime import tensorrt_engine as te  # noqa: E402
from iadgpt.errors import BundleError  # noqa: E402

from conftest import rewrite_manifest  # noqa: E402

BACKBONE = {
    "name": "tiny",
    "input_spec": {"size": [32, 48], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                   "resize": "bilinear", "color": "rgb"},
    "layers": ["layer2", "layer3"],
    "dims": [8, 16],
    "strides": [8, 16],
}


def linear_model(w_scale: float = 1.0) -> onnx.ModelProto:
    w = numpy_helper.from_array((np.arange(12, dtype=np.float32).reshape(4, 3) * w_scale), "W")
    b = numpy_helper.from_array(np.ones(3, dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    p = tmp_path / "src" / "enc.onnx"
    p.parent.mkdir()
    onnx.save(linear_model(), str(p))
    return p


def write_bundle(path: Path, onnx_file: Path, bank: np.ndarray | None = None, **extra) -> Bundle:
    with BundleWriter(path, backbone=BACKBONE, scorer={"kind": "memory_bank", "k": 1}) as w:
        w.add_graph("encoder", onnx_file)
        w.add_array("memory_bank", np.arange(20, dtype=np.float32).reshape(5, 4) if bank is None else bank,
                    provenance={"images_sha256": ["ab" * 32], "prompt_yaml_sha256": "cd" * 32})
        w.set_thresholds({"image": {"value": 0.5}})
        w.set_extra(extra)
    assert w.bundle is not None
    return w.bundle


def test_round_trip(tmp_path: Path, onnx_file: Path) -> None:
    out = tmp_path / "bundle"
    written = write_bundle(out, onnx_file, note="hello")
    b = Bundle.load(out)
    assert b.manifest == written.manifest
    m = b.manifest
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["versions"]["numpy"] == np.__version__
    assert m["created"]
    assert m["scorer"] == {"kind": "memory_bank", "k": 1}
    assert m["thresholds"] == {"image": {"value": 0.5}} and m["extra"] == {"note": "hello"}
    g = m["graphs"]["encoder"]
    assert g["sha256"] == sha256_file(onnx_file) and g["precision"] == "fp32"
    assert g["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    assert g["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]
    assert b.graph_path("encoder").read_bytes() == onnx_file.read_bytes()
    assert b.graph_io("encoder")[0] == [TensorInfo("x", "float32", ("batch", 4))]
    arr = b.array("memory_bank")
    np.testing.assert_array_equal(arr, np.arange(20, dtype=np.float32).reshape(5, 4))
    assert m["references"]["memory_bank"]["provenance"]["prompt_yaml_sha256"] == "cd" * 32
    assert b.input_spec == InputSpec((32, 48), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", "rgb")
    # no temp directories left next to the bundle
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_create_from_bytes_and_missing_names(tmp_path: Path) -> None:
    b = Bundle.create(tmp_path / "b", backbone=BACKBONE,
                      graphs={"scorer": linear_model().SerializeToString()},
                      references={"bank": np.zeros((2, 3), np.float16)})
    assert b.graphs["scorer"]["inputs"][0]["name"] == "x"
    assert b.array("bank").dtype == np.float16
    with pytest.raises(BundleError, match="no graph 'encoder'.*scorer"):
        b.graph_path("encoder")
    with pytest.raises(BundleError, match="no reference array 'nope'"):
        b.array("nope")


def test_explicit_io_without_reading_onnx(tmp_path: Path) -> None:
    with BundleWriter(tmp_path / "b") as w:
        w.add_graph("encoder", b"not parsed", inputs=[{"name": "img", "dtype": "float32", "shape": [1, 3, 8, 8]}],
                    outputs=[TensorInfo("feat", "float16", (1, 4))], precision="int8")
    g = Bundle.load(tmp_path / "b").graphs["encoder"]
    assert g["inputs"][0]["shape"] == [1, 3, 8, 8] and g["outputs"][0]["dtype"] == "float16"
    assert g["precision"] == "int8"


def test_external_data_files_are_listed_and_hashed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    model = linear_model()
    onnx.save_model(model, str(src / "big.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data", size_threshold=0)
    b = Bundle.create(tmp_path / "b", graphs={"encoder": src / "big.onnx"})
    ext = b.graphs["encoder"]["external_data"]
    assert [e["file"] for e in ext] == ["graphs/big.onnx.data"]
    assert ext[0]["sha256"] == sha256_file(src / "big.onnx.data")
    # the copied graph still finds its weights
    loaded = onnx.load(str(b.graph_path("encoder")))
    assert numpy_helper.to_array(loaded.graph.initializer[0]).shape == (4, 3)
    # a corrupt weight file is caught and named
    data = tmp_path / "b" / "graphs" / "big.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"graphs/big\.onnx\.data.*external data"):
        Bundle.load(tmp_path / "b")


def test_flipped_byte_in_graph_names_the_file(tmp_path: Path, onnx_file: Path) -> None:
    out = tmp_path / "bundle"
    write_bundle(out, onnx_file)
    g = out / "graphs" / "encoder.onnx"
    raw = bytearray(g.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    g.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"graphs/encoder\.onnx.*corrupt or was modified.*re-export"):
        Bundle.load(out)
    Bundle.load(out, verify=False)  # explicit opt-out still reads the manifest


def test_missing_file(tmp_path: Path, onnx_file: Path) -> None:
    out = tmp_path / "bundle"
    write_bundle(out, onnx_file)
    (out / "references" / "memory_bank.npy").unlink()
    with pytest.raises(BundleError, match=r"references/memory_bank\.npy.*missing.*restore"):
        Bundle.load(out)


@pytest.mark.parametrize("version, word", [(SCHEMA_VERSION + 1, "newer"), (0, "older")])
def test_unknown_schema(tmp_path: Path, onnx_file: Path, version: int, word: str) -> None:
    out = tmp_path / "bundle"
    write_bundle(out, onnx_file)
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["schema_version"] = version
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=rf"{word} iadgpt \(schema {version}.*iadgpt export"):
        Bundle.load(out)


@pytest.mark.parametrize("text", ['{"schema_version": 1, "graphs": {', "[1, 2]", '{"schema_version": NaN}', "\xff"])
def test_corrupt_manifest(tmp_path: Path, onnx_file: Path, text: str) -> None:
    out = tmp_path / "bundle"
    write_bundle(out, onnx_file)
    (out / MANIFEST_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError, match=MANIFEST_NAME):
        Bundle.load(out)


def test_manifest_paths_cannot_escape(tmp_path: Path, onnx_file: Path) -> None:
    out = tmp_path / "bundle"
    write_bundle(out, onnx_file)
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["graphs"]["encoder"]["file"] = "../src/enc.onnx"
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="inside the bundle"):
        Bundle.load(out)


def test_dir_without_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.load(tmp_path / "half")


def test_crash_inside_writer_keeps_old_bundle(tmp_path: Path, onnx_file: Path) -> None:
    out = tmp_path / "bundle"
    old = write_bundle(out, onnx_file)
    old_manifest = old.manifest
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(out, backbone=BACKBONE) as w:
            w.add_graph("encoder", onnx_file)
            w.add_array("memory_bank", np.ones((3, 3), np.float32))
            raise RuntimeError("boom")
    assert not w.tmp_dir.exists()
    assert Bundle.load(out).manifest == old_manifest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_killed_writer_leaves_nothing_loadable(tmp_path: Path, onnx_file: Path) -> None:
    out = tmp_path / "bundle"
    old = write_bundle(out, onnx_file)
    w = BundleWriter(out, backbone=BACKBONE)  # simulates a process killed before commit
    w.add_graph("encoder", onnx_file)
    w.add_array("memory_bank", np.ones((3, 3), np.float32))
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.load(w.tmp_dir)
    assert Bundle.load(out).manifest == old.manifest
    w.abort()


def test_failure_while_committing_keeps_old_bundle(tmp_path: Path, onnx_file: Path, monkeypatch) -> None:
    out = tmp_path / "bundle"
    old = write_bundle(out, onnx_file)
    import iadgpt.bundle as bundle_mod

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, "write_atomic", fail)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(out, onnx_file, bank=np.zeros((1, 4), np.float32))
    monkeypatch.undo()
    assert Bundle.load(out).manifest == old.manifest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_refuses_to_replace_a_non_bundle_directory(tmp_path: Path, onnx_file: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("x")
    with pytest.raises(BundleError, match="not a bundle"):
        BundleWriter(tmp_path / "home")
    assert (tmp_path / "home" / "precious.txt").exists()


def test_object_arrays_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="object"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_array("bad", np.array([{"a": 1}], dtype=object))
    assert not (tmp_path / "b").exists()


def test_loading_never_unpickles(tmp_path: Path, onnx_file: Path, monkeypatch) -> None:
    out = tmp_path / "bundle"
    write_bundle(out, onnx_file)
    # swap the reference for a pickled object array and make the manifest hash match it
    ref = out / "references" / "memory_bank.npy"
    np.save(ref, np.array([{"evil": 1}, None], dtype=object), allow_pickle=True)
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["references"]["memory_bank"]["sha256"] = sha256_file(ref)
    (out / MANIFEST_NAME).write_text(json.dumps(m))

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used while loading a bundle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    calls: list[dict] = []
    real_load = np.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy_load)
    with pytest.raises(BundleError, match=r"memory_bank\.npy holds Python objects"):
        Bundle.load(out)  # refused from the .npy header alone
    b = Bundle.load(out, verify=False)
    with pytest.raises(BundleError, match=r"memory_bank\.npy"):
        b.array("memory_bank")
    assert calls and all(c.get("allow_pickle") is False for c in calls)


def test_update_manifest_and_engines(tmp_path: Path, onnx_file: Path) -> None:
    out = tmp_path / "bundle"
    b = write_bundle(out, onnx_file)
    b.update_manifest(thresholds={"pixel": {"value": np.float32(0.25)}})
    assert Bundle.load(out).thresholds == {"image": {"value": 0.5}, "pixel": {"value": 0.25}}
    b.update_manifest(thresholds={"image": {"value": 0.7}}, replace=True)
    assert Bundle.load(out).thresholds == {"image": {"value": 0.7}}
    with pytest.raises(BundleError, match="strict JSON"):
        b.update_manifest(extra={"note": float("nan")})
    for bad in ("high", 0.7, {"value": "NaN"}, {"value": float("nan")}, {"value": True},
                {"method": "quantile"}):  # hand edits a Detector would trip on
        with pytest.raises(BundleError, match=r"thresholds.image needs a finite number `value`.*iadgpt calibrate"):
            b.update_manifest(thresholds={"image": bad})
    assert Bundle.load(out).thresholds == {"image": {"value": 0.7}}

    eng = tmp_path / "encoder.fp16.trt10.3.0.sm89.engine"
    eng.write_bytes(b"\x00engine")
    entry = b.add_engine("encoder.fp16", eng, precision="fp16", trt_version="10.3.0", compute_capability=(8, 9))
    assert entry["file"] == "engines/encoder.fp16.trt10.3.0.sm89.engine" and entry["compute_capability"] == "8.9"
    loaded = Bundle.load(out)
    assert loaded.engine_path("encoder.fp16").read_bytes() == b"\x00engine"
    loaded.engine_path("encoder.fp16").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"engines/encoder.*iadgpt build"):
        Bundle.load(out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_bundle_module_does_not_import_torch() -> None:
    code = ("import sys, iadgpt.bundle, iadgpt.runtime.engines; "
            "bad = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'onnx') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bundle_files_follow_the_umask_so_another_user_can_read_them(tmp_path: Path, onnx_file: Path) -> None:
    old = os.umask(0o022)
    try:
        b = write_bundle(tmp_path / "bundle", onnx_file)
        b.update_manifest(extra={"note": "x"})  # rewrites manifest.json through a temp file
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "bundle" / "manifest.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_empty_arrays_and_bad_input_specs_are_refused(tmp_path: Path, onnx_file: Path) -> None:
    with pytest.raises(BundleError, match="'memory_bank' is empty"):
        write_bundle(tmp_path / "empty", onnx_file, bank=np.zeros((0, 4), np.float32))
    b = write_bundle(tmp_path / "b", onnx_file)
    bank = b.path / "references" / "memory_bank.npy"  # an empty bank made by hand, hashes kept consistent
    np.save(bank, np.zeros((0, 4), np.float32))
    manifest = json.loads((b.path / "manifest.json").read_text())
    manifest["references"]["memory_bank"].update(sha256=sha256_file(bank), shape=[0, 4])
    (b.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="memory_bank.npy is empty"):
        Bundle.load(b.path)
    b = write_bundle(tmp_path / "b2", onnx_file)
    manifest = json.loads((b.path / "manifest.json").read_text())
    for spec in ({"size": [0, 0], "mean": [0, 0, 0], "std": [1, 1, 1]},
                 {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 0, 1]},
                 # a resize the runtime lacks passed `inspect` (its probe frame needed none); "bgr" was ignored
                 {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1], "resize": "magic"},
                 {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1], "color": "bgr"}):
        manifest["backbone"]["input_spec"] = spec
        (b.path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match="input_spec is malformed"):
            Bundle.load(b.path).input_spec


@pytest.mark.parametrize("key, value", [("shots", "many"), ("shots", -1), ("coreset", 2), ("sigma", "four"),
                                        ("sigma", -4), ("grid_stride", 0), ("image_size", [999]), ("kind", 3),
                                        ("references", {"bank": "no_such_array"}), ("logit_scale", -1)])
def test_hand_edited_scorer_fields_are_refused_at_load(tmp_path: Path, onnx_file: Path, key, value) -> None:
    # These ended `iadgpt eval` / the torch backend in a ValueError traceback, or were used as given
    b = write_bundle(tmp_path / "b", onnx_file)
    manifest = json.loads((b.path / "manifest.json").read_text())
    manifest["scorer"][key] = value
    (b.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"scorer\.{key} must .*iadgpt export"):
        Bundle.load(b.path)


def test_check_bundle_target_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        check_bundle_target(tmp_path / "file")
    with pytest.raises(BundleError, match="not a bundle"):
        check_bundle_target(tmp_path / "other")
    with pytest.raises(BundleError, match="not a folder this user can write"):
        check_bundle_target(tmp_path / "file" / "below")
    check_bundle_target(tmp_path / "new" / "deeper")  # parents are made later: fine


def test_a_file_linked_from_outside_the_bundle_is_refused(tmp_path: Path, onnx_file: Path) -> None:
    """Same bytes, same hash, but not inside the bundle: a station must not read files a bundle only
    points at (they can change under it)."""
    out = tmp_path / "bundle"
    write_bundle(out, onnx_file)
    ref = out / "references" / "memory_bank.npy"
    outside = tmp_path / "outside.npy"
    os.replace(ref, outside)
    ref.symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(out)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(schema_version=True), "no integer schema_version"),
    (lambda m: m.update(engines={"enc": "engines/enc.engine"}), "engines.enc needs `file` and `sha256`"),
], ids=["boolean schema_version", "engine entry not an object"])
def test_malformed_manifest_fields_are_refused_at_load(tmp_path, onnx_file, edit, match):
    b = write_bundle(tmp_path / "b", onnx_file)
    rewrite_manifest(b.path, edit)
    with pytest.raises(BundleError, match=match):
        Bundle.load(b.path)


def test_infinite_mean_in_input_spec_is_refused(tmp_path, onnx_file):
    b = write_bundle(tmp_path / "b", onnx_file)
    m = json.loads((b.path / MANIFEST_NAME).read_text())
    m["backbone"]["input_spec"]["mean"] = [0, 0, 0]
    text = json.dumps(m).replace('"mean": [0, 0, 0]', '"mean": [1e999, 0, 0]')
    (b.path / MANIFEST_NAME).write_text(text)
    with pytest.raises(BundleError, match="input_spec is malformed"):
        Bundle.load(b.path).input_spec


def test_update_manifest_rereads_disk(tmp_path, onnx_file):
    b = write_bundle(tmp_path / "b", onnx_file)
    other = Bundle.load(b.path)
    b.update_manifest(extra={"a": 1})
    other.update_manifest(extra={"b": 2})  # must not undo the first step's change
    assert Bundle.load(b.path).extra == {"a": 1, "b": 2}


def test_update_manifest_engine_entries(tmp_path, onnx_file):
    b = write_bundle(tmp_path / "b", onnx_file)
    with pytest.raises(BundleError, match="copy it into the bundle first"):
        b.update_manifest(engines={"enc": {"file": "engines/enc.engine"}})
    (b.path / "engines").mkdir()
    (b.path / "engines" / "enc.engine").write_bytes(b"e")
    b.update_manifest(engines={"enc": {"file": "engines/enc.engine"}})
    assert Bundle.load(b.path).engines["enc"]["sha256"] == te.sha256_file(b.path / "engines" / "enc.engine")


def test_swap_restores_old_and_cleans_up(tmp_path, onnx_file, monkeypatch):
    """A failed staged -> target rename puts the old bundle back (not the staged one) and leaves no
    `.bundle.old-*` folder behind; the staged folder is left as it was."""
    import iadgpt.bundle as bm

    out = tmp_path / "bundle"
    write_bundle(out, onnx_file, note="first")
    write_bundle(out, onnx_file, bank=np.ones((2, 4), np.float32), note="old")  # a replace leaves no .old dir
    staged = write_bundle(tmp_path / "staged", onnx_file, bank=np.full((3, 4), 7.0, np.float32), note="staged").path
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    before = Bundle.load(out).manifest
    assert before != Bundle.load(staged).manifest
    real, calls = os.rename, []

    def rename(a, b):
        calls.append((Path(a), Path(b)))
        if len(calls) == 2:  # the staged -> target rename fails
            raise OSError("boom")
        return real(a, b)

    monkeypatch.setattr(bm.os, "rename", rename)
    with pytest.raises(OSError, match="boom"):
        bm.swap_into_place(staged, out)
    monkeypatch.undo()
    aside = calls[0][1]
    assert calls[:2] == [(out, aside), (staged, out)] and aside.name.startswith(".bundle.old-")
    restored = Bundle.load(out)
    assert restored.manifest == before and restored.extra == {"note": "old"}
    assert np.array_equal(restored.array("memory_bank"), np.ones((2, 4), np.float32))
    assert not aside.exists() and list(tmp_path.glob(".bundle.old-*")) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert Bundle.load(staged).extra == {"note": "staged"}
