"""Decoder training on NSA samples of tiny synthetic parts: loss goes down, safetensors checkpoints,
resume continues the step count on the same trajectory, seeded runs agree, the CLI works."""
from __future__ import annotations

import json
import struct
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from iadgpt.errors import ScorerError
from iadgpt.models.fusion import WEIGHT_GRID
from iadgpt.models.backbones import get_backbone
from iadgpt.models.train import (CHECKPOINT_FORMAT, TrainConfig, build_pool, load_checkpoint, load_decoder,
                                 train_decoder)
from iadgpt.runtime.synthetic import SyntheticProduct

SIZE = 64
CFG = TrainConfig(steps=24, batch_size=8, pool_size=12, loss_size=32, log_every=8, checkpoint_every=1000,
                  lr=2e-3, augment=True)




@pytest.fixture(scope="module")
def backbone():
    return get_backbone("efficientnet-lite0", size=SIZE)


@pytest.fixture(scope="module")
def images():
    product = SyntheticProduct(kind="part", size=SIZE, seed=21, defect_rate=0.0)
    return [product.sample(i).image for i in range(6)]


@pytest.fixture(scope="module")
def pool(backbone, images):
    return build_pool(backbone, images, CFG, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone, images, pool):
    out = tmp_path_factory.mktemp("train") / "dec.safetensors"
    return train_decoder(backbone, images, out, CFG, pool=pool, progress=False, meta={"category": "part"})


def _weights(decoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in decoder.state_dict().items()}


def test_pool(pool) -> None:
    assert len(pool) == CFG.pool_size and pool.kind == "object" and pool.local_pool == CFG.pool
    assert [f.shape[1] for f in pool.synth] == [24, 40, 112] and pool.synth[0].dtype == torch.float16
    assert pool.labels.shape == (CFG.pool_size, CFG.loss_size, CFG.loss_size)
    assert int(pool.pair.max()) < len(pool.normal[0])
    assert (pool.labels.float() > 0.3).any()
    # features are cached already standardised by the normal statistics
    assert abs(float(pool.normal[2].float().mean())) < 0.05


def test_loss_decreases_and_checkpoint_is_safetensors(trained) -> None:
    losses = [loss for _, loss in trained.history]
    assert trained.step == CFG.steps and len(losses) == 3
    assert losses[-1] < losses[0]
    raw = trained.checkpoint.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])  # a safetensors header, not a pickle
    assert header["__metadata__"]["format"] == CHECKPOINT_FORMAT
    assert not raw.startswith(b"\x80") and b"torch._utils" not in raw
    tensors, meta = load_checkpoint(trained.checkpoint)
    assert meta["step"] == CFG.steps and meta["category"] == "part" and meta["backbone"]["name"] == "efficientnet-lite0"
    assert any(k.startswith("optimizer.") for k in tensors)  # Adam state, for resume
    assert meta["train_config"]["layers"] == [1, 2]  # DEFAULT_LAYERS of efficientnet-lite0
    decoder, _ = load_decoder(trained.checkpoint)
    for k, v in _weights(trained.decoder).items():
        assert torch.equal(decoder.state_dict()[k], v)


def test_resume_continues_the_same_run(tmp_path, monkeypatch, backbone, images, pool, trained) -> None:
    """A run checkpointed at step 12 and resumed to 24 ends with the uninterrupted run's weights."""
    import shutil

    import iadgpt.models.train as tr
    out, mid = tmp_path / "run.safetensors", tmp_path / "step12.safetensors"
    real_save = tr._save

    def save_and_keep(path, decoder, opt, step, *args):
        real_save(path, decoder, opt, step, *args)
        if step == 12:
            shutil.copy(path, mid)

    monkeypatch.setattr(tr, "_save", save_and_keep)
    train_decoder(backbone, images, out, replace(CFG, checkpoint_every=12), pool=pool, progress=False,
                  meta={"category": "part"})
    assert load_checkpoint(mid)[1]["step"] == 12
    again = train_decoder(backbone, images, mid, replace(CFG, checkpoint_every=12), pool=pool, progress=False,
                          resume=True, meta={"category": "part"})
    assert again.step == CFG.steps and load_checkpoint(mid)[1]["step"] == CFG.steps
    assert [s for s, _ in again.history] == [8, 16, 24]
    # the loss window open at the stop (steps 9-12) is carried over: the log reads as the unstopped run's
    assert [loss for _, loss in again.history] == pytest.approx([loss for _, loss in trained.history], rel=1e-5)
    ref = _weights(trained.decoder)
    for k, v in _weights(again.decoder).items():
        assert torch.allclose(v, ref[k], atol=1e-6), k


def test_a_signal_mid_step_saves_the_whole_step_and_resumes_on_the_trajectory(tmp_path, monkeypatch, backbone, images,
                                                                              pool, trained) -> None:
    """Ctrl-C / SIGTERM land anywhere in a step; the run stops at the step's end and saves it whole.

    The signal here arrives right after the optimizer moved the weights: a KeyboardInterrupt raised
    there saved step 6's counter with step 7's weights, and the resumed run left the trajectory."""
    import os
    import signal

    from iadgpt.signals import StopAfterStep
    out = tmp_path / "run.safetensors"
    real_step, calls = torch.optim.AdamW.step, []

    def step_then_signal(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(StopAfterStep):
        train_decoder(backbone, images, out, CFG, pool=pool, progress=False, meta={"category": "part"})
    assert load_checkpoint(out)[1]["step"] == 7
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    again = train_decoder(backbone, images, out, CFG, pool=pool, progress=False, resume=True, meta={"category": "part"})
    ref = _weights(trained.decoder)
    for k, v in _weights(again.decoder).items():
        assert torch.allclose(v, ref[k], atol=1e-6), k


def test_a_second_signal_stops_at_once_and_keeps_the_saved_step(tmp_path, monkeypatch, backbone, images, pool) -> None:
    """A step that hangs: the second signal interrupts inside it, and the file keeps the last whole step."""
    import os
    import signal

    from iadgpt.signals import StopAfterStep
    out = tmp_path / "run.safetensors"
    real_step, calls = torch.optim.AdamW.step, []

    def step_twice_signalled(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # (SIGINT may be ignored where the tests run in the background)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_twice_signalled)
    with pytest.raises(KeyboardInterrupt) as info:
        train_decoder(backbone, images, out, replace(CFG, checkpoint_every=2), pool=pool, progress=False)
    assert not isinstance(info.value, StopAfterStep)
    assert load_checkpoint(out)[1]["step"] == 4


def test_a_stop_during_the_last_step_finishes_the_checkpoint_and_still_stops(tmp_path, monkeypatch, backbone,
                                                                             images, pool, trained) -> None:
    """A caller running more after training (benchmarks/bridge.py trains the bridge next) must see the stop."""
    import os
    import signal

    from iadgpt.signals import StopAfterStep
    real_step, calls = torch.optim.AdamW.step, []

    def step_then_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == CFG.steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    with pytest.raises(StopAfterStep):
        train_decoder(backbone, images, tmp_path / "d.safetensors", CFG, pool=pool, progress=False)
    decoder, meta = load_decoder(tmp_path / "d.safetensors")
    assert meta["step"] == CFG.steps
    ref = _weights(trained.decoder)
    assert all(torch.allclose(v, ref[k], atol=1e-6) for k, v in decoder.state_dict().items())


def test_same_seed_same_weights(tmp_path, backbone, images, pool, trained) -> None:
    cfg = replace(CFG, steps=4)
    a = train_decoder(backbone, images, tmp_path / "a.safetensors", cfg, pool=pool, progress=False)
    b = train_decoder(backbone, images, tmp_path / "b.safetensors", cfg, pool=pool, progress=False)
    c = train_decoder(backbone, images, tmp_path / "c.safetensors", replace(cfg, seed=1), pool=pool, progress=False)
    wa, wb, wc = _weights(a.decoder), _weights(b.decoder), _weights(c.decoder)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["projections.1.weight"], wc["projections.1.weight"])


def test_refusals(tmp_path, backbone, images, pool, trained) -> None:
    with pytest.raises(ScorerError, match="--resume"):
        train_decoder(backbone, images, trained.checkpoint, CFG, pool=pool, progress=False)
    with pytest.raises(ScorerError, match="same settings"):
        train_decoder(backbone, images, trained.checkpoint, replace(CFG, steps=30, embed_dim=32), pool=pool,
                      progress=False, resume=True)
    with pytest.raises(ScorerError, match="same settings"):  # another anomaly mix is another run
        train_decoder(backbone, images, trained.checkpoint, replace(CFG, steps=30, colour=0.5), pool=pool,
                      progress=False, resume=True)
    with pytest.raises(ScorerError, match="larger --steps"):
        train_decoder(backbone, images, trained.checkpoint, replace(CFG, steps=10), pool=pool, progress=False,
                      resume=True)
    # another resolution or another image set was resumed silently, the metadata rewritten to hide it
    with pytest.raises(ScorerError, match=f"trained at {SIZE} px, not 96; resume with --resolution {SIZE}"):
        train_decoder(get_backbone("efficientnet-lite0", size=96), [cv2.resize(im, (96, 96)) for im in images],
                      trained.checkpoint, replace(CFG, steps=30), pool=pool, progress=False, resume=True,
                      meta={"category": "part"})
    counted = tmp_path / "counted.safetensors"
    train_decoder(backbone, images, counted, replace(CFG, steps=2), pool=pool, progress=False,
                  meta={"category": "part", "data": "a", "n_train_images": 6})
    with pytest.raises(ScorerError, match="trained on 6 images of 'a', this run has 4 in 'b'"):
        train_decoder(backbone, images, counted, replace(CFG, steps=4), pool=pool, progress=False, resume=True,
                      meta={"category": "part", "data": "b", "n_train_images": 4})
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(ScorerError, match="iadgpt train"):
        load_checkpoint(bad)
    # the format tag right, the decoder config missing or the weights not its shapes: one clear error
    from safetensors.torch import load_file, save_file
    raw = load_checkpoint(trained.checkpoint)[1]
    tensors = load_file(str(trained.checkpoint))
    edited = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in raw.items() if k != "decoder_config"}
    save_file(tensors, str(tmp_path / "no_config.safetensors"), metadata=edited)
    with pytest.raises(ScorerError, match="do not fit together.*re-run `iadgpt train`"):
        load_decoder(tmp_path / "no_config.safetensors")
    name = next(k for k in tensors if k.startswith("decoder.") and tensors[k].ndim == 2)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata={**edited, "decoder_config": json.dumps(
        raw["decoder_config"])})
    with pytest.raises(ScorerError, match="do not fit together"):
        load_decoder(tmp_path / "cut.safetensors")
    config = raw["decoder_config"]
    save_file(load_file(str(trained.checkpoint)), str(tmp_path / "inf.safetensors"), metadata={
        **edited, "decoder_config": json.dumps({**config, "sigma": float("inf")})})  # JSON's Infinity
    with pytest.raises(ScorerError, match="do not fit together"):
        load_decoder(tmp_path / "inf.safetensors")
    save_file({k: v.bool() if k.startswith("decoder.") else v for k, v in load_file(str(trained.checkpoint)).items()},
              str(tmp_path / "bool.safetensors"), metadata={**edited, "decoder_config": json.dumps(config)})
    with pytest.raises(ScorerError, match="not floating point"):  # was loaded as 0/1 weights
        load_decoder(tmp_path / "bool.safetensors")
    # the bridge stage runs at the backbone's default size: a decoder trained at another one is refused
    from iadgpt.models.bridge_train import train_bridge
    with pytest.raises(ScorerError, match=f"trained at {SIZE} px; the bridge stage runs at efficientnet-lite0's "
                                          "default 224 px"):
        train_bridge(tmp_path, "part", tmp_path / "bridge.safetensors", trained.checkpoint, progress=False)


def test_cli_train(tmp_path, monkeypatch) -> None:
    import cv2

    from iadgpt.cli import main
    good = tmp_path / "data" / "part" / "train" / "good"
    good.mkdir(parents=True)
    product = SyntheticProduct(kind="part", size=SIZE, seed=3, defect_rate=0.0)
    for i in range(3):
        cv2.imwrite(str(good / f"{i:03d}.png"), cv2.cvtColor(product.sample(i).image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "dec.safetensors"
    args = ["train", "--nsa-colour", "0.5", "--data", str(tmp_path / "data"), "--category", "part",
            "--resolution", str(SIZE), "--out",
            str(out), "--steps", "2", "--pool-size", "4", "--batch-size", "4"]
    assert main(args) == 0
    assert load_checkpoint(out)[1]["step"] == 2 and load_checkpoint(out)[1]["train_config"]["colour"] == 0.5
    assert main(args[:-6] + ["--steps", "3", "--pool-size", "4", "--batch-size", "4", "--resume"]) == 0
    assert load_checkpoint(out)[1]["step"] == 3
    assert main(args) == 2  # exists, no --resume: refused with a message


@pytest.mark.parametrize("field,value,flag", [("steps", 0, "--steps"), ("steps", -5, "--steps"),
                                              ("batch_size", 0, "--batch-size"), ("pool_size", 0, "--pool-size"),
                                              ("checkpoint_every", 0, "--checkpoint-every"), ("lr", -1.0, "--lr"),
                                              ("lr", float("nan"), "--lr"), ("colour", 1.5, "--nsa-colour"),
                                              ("seed", -1, "--seed")])
def test_config_refuses_nonsense_numbers(field, value, flag) -> None:
    with pytest.raises(ScorerError, match=f"^{flag} "):
        TrainConfig(**{field: value})
    assert TrainConfig(steps=np.int64(3), lr=np.float32(0.5)).to_dict()["steps"] == 3  # numpy numbers are fine


@pytest.mark.parametrize("flags,flag", [(["--steps", "0"], "--steps"), (["--pool-size", "0"], "--pool-size"),
                                        (["--checkpoint-every", "0"], "--checkpoint-every"), (["--lr", "-1"], "--lr"),
                                        (["--batch-size", "0"], "--batch-size"), (["--threads", "0"], "--threads"),
                                        (["--stage", "bridge", "--decoder", "d.safetensors", "--stage-steps", "1,-1,1"],
                                         "--stage-steps"),
                                        (["--stage", "bridge", "--decoder", "d.safetensors", "--pool-size", "0"],
                                         "--pool-size"),
                                        (["--stage", "bridge", "--decoder", "d.safetensors", "--lr", "0"], "--lr")])
def test_cli_train_refuses_nonsense_numbers_before_work(tmp_path, monkeypatch, capsys, flags, flag) -> None:
    from iadgpt.cli import main
    from iadgpt.models import train as train_module
    monkeypatch.setattr(train_module, "get_backbone", lambda *a, **k: pytest.fail("built a backbone"))
    out = tmp_path / "dec.safetensors"  # the data folder does not even exist: the flags are checked first
    assert main(["train", "--data", str(tmp_path / "nope"), "--category", "part", "--out", str(out)] + flags) == 2
    assert f"error: {flag} " in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("shots,weight", [(None, None), (1, "auto"), (1, 0.3)],
                         ids=["decoder", "decoder+bank", "decoder+bank(w 0.3)"])
def test_export_bundle_with_decoder(tmp_path, capsys, trained, images, shots, weight) -> None:
    """`export_bundle(decoder=...)`: decoder-only and fused scorer graphs, parity-checked, run by the Detector."""
    import cv2

    from iadgpt.export.bundle_export import export_bundle
    from iadgpt.runtime.detector import Detector
    from iadgpt.runtime.preprocess import to_batch
    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(images[:5]):
        cv2.imwrite(str(good / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    bundle, report = export_bundle("efficientnet-lite0", good, tmp_path / "b", shots=shots, resolution=SIZE,
                                   decoder=trained.checkpoint, fusion_weight=weight, progress=False)
    assert report.scorer_parity.ok and report.encoder.ok
    assert report.scorer_parity.probes[0] == "batch 4"  # 2 normal images + 2 NSA anomalies from the train dir
    if shots is None:
        assert bundle.scorer["kind"] == "decoder" and bundle.scorer["references"] == {}
        assert report.scorer_parity.inputs == ["feat0", "feat1", "feat2"]
    else:
        assert bundle.scorer["kind"] == "decoder+memory_bank" and bundle.scorer["references"] == {"bank": "memory_bank"}
        fusion = bundle.scorer["fusion"]
        choice = fusion["weight_choice"]
        assert fusion["stats"][1] > 0
        if weight == "auto":  # 4 non-shots: 2 painted validation images, 2 for the statistics, disjoint
            assert len(fusion["stats_images"]) == 2 and len(choice["images"]) == 2
            val = {name for name, _defect in choice["images"]}
            shots = set(bundle.references["memory_bank"]["provenance"]["files"])
            assert not val & set(fusion["stats_images"]) and not val & shots
            weights, aurocs, errors = (list(col) for col in zip(*choice["grid"]))
            assert weights == list(WEIGHT_GRID) and 0.5 < max(aurocs) <= 1 and min(errors) >= 0
            best = int(np.argmax(aurocs))  # the one-SE rule: the smallest weight within one SE of the best
            assert fusion["weight"] == next(w for w, a in zip(weights, aurocs) if a >= aurocs[best] - errors[best])
        else:
            assert fusion["weight"] == weight and choice == {"method": "given"} and len(fusion["stats_images"]) == 4
    assert bundle.scorer["decoder"]["step"] == CFG.steps
    batch = to_batch(images[4:6], bundle.input_spec)
    with Detector(bundle, "onnxruntime", threshold=float("inf")) as det:
        maps, scores = det.score_batch(batch)[:2]
    assert maps.shape == (2, SIZE, SIZE) and scores.shape == (2,) and np.isfinite(maps).all()
    # the bundle carries the decoder's weights: the torch backend and the GPU fast path (run eagerly
    # on the CPU here; opening it checks it against the ONNX graphs) rebuild the same scorer
    from iadgpt.runtime.cuda_graph import PARITY, map_parity
    names = bundle.scorer["decoder"]["arrays"]
    assert set(names) == set(trained.decoder.state_dict()) and all(bundle.array(a).size for a in names.values())
    from iadgpt.cli import main
    capsys.readouterr()
    assert main(["inspect", str(bundle.path)]) == 0  # the tensors are listed as one line, files intact
    shown = capsys.readouterr().out
    assert f"{len(names)} decoder tensors" in shown and "decoder.feat_mean0" not in shown
    # compared on defective parts: on the nearly flat map of a training image, float32 rounding of the
    # bank search is a visible share of the map's range (a relative bound would measure only that)
    from iadgpt.runtime.synthetic import SyntheticProduct
    broken = SyntheticProduct(kind="part", size=SIZE, seed=5, defect_rate=1.0)
    batch = to_batch([broken.sample(i).image for i in range(3)], bundle.input_spec)
    with Detector(bundle, "onnxruntime", threshold=float("inf")) as det:
        maps, scores = det.score_batch(batch)[:2]
    with Detector(bundle, "torch", threshold=float("inf")) as det:
        tmaps, tscores = det.score_batch(batch)[:2]
    report = map_parity(tmaps, maps, tscores, scores)
    assert all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report
    with Detector(bundle, "cuda-graph", device="cpu", threshold=float("inf")) as det:
        gmaps, gscores = det.score_batch(batch)[:2]
    report = map_parity(gmaps, maps, gscores, scores)
    assert all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report
    # a decoder bundle from before the weights travelled with it: the rebuild names the way out
    from types import SimpleNamespace

    from iadgpt.errors import BundleError
    from iadgpt.models.fusion import scorer_from_bundle
    old = SimpleNamespace(path=bundle.path, scorer={**bundle.scorer, "decoder": {"decoder_config": {}}})
    with pytest.raises(BundleError, match="re-export it with `iadgpt export --decoder"):
        scorer_from_bundle(old)
    edited = SimpleNamespace(path=bundle.path, array=bundle.array, scorer={**bundle.scorer, "decoder": {
        **bundle.scorer["decoder"], "decoder_config": {**bundle.scorer["decoder"]["decoder_config"], "sigma": None}}})
    with pytest.raises(BundleError, match="do not fit together.*sigma"):  # an edited manifest: no traceback
        scorer_from_bundle(edited)
    if shots is not None:  # a new bank needs new fusion statistics: calibrate says to re-export
        from iadgpt.calibration.onboard import calibrate
        from iadgpt.errors import CalibrationError
        with pytest.raises(CalibrationError, match="re-export with `iadgpt export --decoder"):
            calibrate(bundle.path, good, shots=1, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here: a decoder+bank bundle on the GPU fast path is checked on a lent GPU "
                           "(pytest -m gpu tests/test_train.py)")
def test_decoder_bundle_on_the_gpu_fast_path(tmp_path, trained, images) -> None:
    """fp16 + compile + graph replay of the rebuilt decoder+bank scorer, within the fp16 parity bounds
    of the bundle's ONNX graphs (opening the backend checks it; checked again here on defective parts)."""
    import cv2

    from iadgpt.export.bundle_export import export_bundle
    from iadgpt.runtime.cuda_graph import PARITY, map_parity
    from iadgpt.runtime.detector import Detector
    from iadgpt.runtime.preprocess import to_batch
    from iadgpt.runtime.synthetic import SyntheticProduct
    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(images[:5]):
        cv2.imwrite(str(good / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    bundle, _ = export_bundle("efficientnet-lite0", good, tmp_path / "b", shots=1, resolution=SIZE,
                              decoder=trained.checkpoint, fusion_weight=0.3, progress=False)
    broken = SyntheticProduct(kind="part", size=SIZE, seed=5, defect_rate=1.0)
    batch = to_batch([broken.sample(i).image for i in range(3)], bundle.input_spec)
    with Detector(bundle, "onnxruntime", threshold=float("inf")) as det:
        maps, scores = det.score_batch(batch)[:2]
    with Detector(bundle, "cuda-graph", threshold=float("inf")) as det:
        assert det.precision == "fp16"
        gmaps, gscores = det.score_batch(batch)[:2]
    report = map_parity(gmaps, maps, gscores, scores)
    assert all(report[k] <= PARITY["fp16"][k] for k in PARITY["fp16"]), report


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_one_thread):
    """Keep these tests at seconds on a shared 2-core box (see conftest)."""


def _copy(trained, tmp_path):
    import shutil
    path = tmp_path / "dec.safetensors"
    shutil.copy(trained.checkpoint, path)
    return path


def test_resuming_a_finished_run_with_the_same_steps_is_a_no_op(tmp_path, backbone, images, pool, trained) -> None:
    """Re-running a finished `iadgpt train --resume` (a script re-run after a later stage failed) is
    not refused as "past --steps"."""
    result = train_decoder(backbone, images, _copy(trained, tmp_path), CFG, pool=pool, progress=False, resume=True,
                           meta={"category": "part"})
    assert result.step == CFG.steps


def test_resume_refuses_another_learning_rate_category_or_backbone(tmp_path, backbone, images, pool, trained) -> None:
    """Each would continue another run silently: another --lr is another trajectory, another category
    another product's images, another backbone (of the same shapes) other features."""
    from safetensors.torch import load_file, save_file
    path = _copy(trained, tmp_path)
    with pytest.raises(ScorerError, match="same settings"):
        train_decoder(backbone, images, path, replace(CFG, steps=30, lr=1e-3), pool=pool, progress=False,
                      resume=True, meta={"category": "part"})
    with pytest.raises(ScorerError, match="trained on category 'part', not 'screw'"):
        train_decoder(backbone, images, path, replace(CFG, steps=30), pool=pool, progress=False, resume=True,
                      meta={"category": "screw"})
    _, meta = load_checkpoint(path)
    meta["backbone"] = {**meta["backbone"], "name": "other-net"}
    save_file(load_file(str(path)), str(path),
              metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()})
    with pytest.raises(ScorerError, match="trained for backbone 'other-net'"):
        train_decoder(backbone, images, path, replace(CFG, steps=30), pool=pool, progress=False, resume=True,
                      meta={"category": "part"})


def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint(tmp_path, monkeypatch, trained) -> None:
    """A crash (disk full, SIGKILL) in the middle of a periodic save must not destroy the only
    checkpoint of a long run: it is written next to it and renamed over it."""
    from pathlib import Path

    import safetensors.torch

    from iadgpt.models.train import save_checkpoint
    path = _copy(trained, tmp_path)
    decoder, _ = load_decoder(path)

    def torn_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", torn_write)
    with pytest.raises(OSError):
        save_checkpoint(path, decoder, None, 99, {"category": "part"})
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["step"] == CFG.steps


def _train_cli(tmp_path, *flags):
    from iadgpt.cli import main
    return main(["train", "--data", str(tmp_path / "nope"), "--category", "x", "--out", str(tmp_path / "b")] + list(flags))


@pytest.mark.parametrize("flags,words", [
    (["--stage", "bridge", "--decoder", "d", "--layers", "1,2"], "--layers is a decoder-stage flag"),
    (["--init", "b.safetensors"], "--init: bridge-stage flag(s)"),
    (["--stage", "bridge", "--decoder", "d", "--stage-steps", "1,2,3,4"], "--stage-steps"),
    (["--stage", "bridge", "--decoder", "d", "--seed", "-1"], "--seed -1"),
    (["--stage", "bridge", "--decoder", "d", "--lr", "inf"], "--lr inf"),
])
def test_train_refuses_before_work(tmp_path, monkeypatch, capsys, flags, words):
    from iadgpt.models import bridge_train
    from iadgpt.models import train as train_mod
    monkeypatch.setattr(bridge_train, "train_bridge", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained"))
    assert _train_cli(tmp_path, *flags) == 2
    assert words in capsys.readouterr().err


def test_train_bridge_passes_init_and_threads(tmp_path, monkeypatch):
    from iadgpt.models import bridge_train
    seen = {}

    def fake(*a, **k):
        seen.update(k)
        return {"history": [], "checkpoint": "c", "pool_seconds": 0, "train_seconds": 0}
    monkeypatch.setattr(bridge_train, "train_bridge", fake)
    assert _train_cli(tmp_path, "--stage", "bridge", "--decoder", "d", "--init", "i.safetensors", "--threads", "3") == 0
    assert str(seen["init"]) == "i.safetensors" and seen["threads"] == 3
