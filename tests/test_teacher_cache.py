"""The teacher-output cache (distill.teacher_cache): exact targets, its key, resume after kill -9,
reuse without running the teachers, refusals, and torchrun."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, ranks_said, run_cli, tiny_recipe, torchrun_distill, write_recipe
from ekdc import distill, load_recipe
from ekdc.data import augment, load_data
from ekdc.distillation import teacher_cache as tc
from ekdc.distillation.distiller import Distiller
from ekdc.training.runtime import Runtime, setup_runtime
from ekdc.errors import UserError
from ekdc.recipe import apply_overrides, recipe_from_dict
from ekdc.run import RunDir
from ekdc.checkpoint import teacher_for_run
from ekdc.teachers import DataInfo

CACHE = {"teacher_cache": {"views": 3}}
DISTILL = {"epochs": 1, "batch_size": 32, "lr": 0.05, "temperature": 4.0}


def _setup(run_path: Path, recipe):
    """(data, teachers, runtime) of a finished run, as the student stage sees them."""
    data = load_data(recipe.data)
    info = DataInfo(list(data.classes), data.image_size, list(data.mean), list(data.std))
    teachers = [teacher_for_run(t, i, info, RunDir(run_path)) for i, t in enumerate(recipe.teachers)]
    return data, teachers, setup_runtime("cpu", "fp32", False)


def _live(teachers, pixels):
    with torch.no_grad():
        return torch.stack([t(pixels) for t in teachers])


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_run")
    over = {"distill": {**DISTILL, "teacher_cache": {"views": 3}}, "mode": "ekd",
            "data": {"dataset": "synthetic", "num_classes": 4, "num_samples": 160, "image_size": 16,
                     "val_fraction": 0.25, "augment": {"crop_padding": 2, "hflip": True, "cutout": 4}}}
    recipe = load_recipe(write_recipe(d / "r.yaml", **over))
    run = distill(recipe, d / "run", progress=False)
    return run.path, recipe


def test_cached_targets_equal_the_live_teachers_on_the_same_view(cached_run):
    run_path, recipe = cached_run
    m = json.loads((run_path / "metrics.json").read_text())
    cache_dir = Path(m["teacher_cache"]["path"])
    assert cache_dir.parent == (run_path / "teacher_cache").resolve() and (cache_dir / "complete.json").exists()
    data, teachers, rt = _setup(run_path, recipe)
    layout = tc.Layout(**{**json.loads((cache_dir / "key.json").read_text())["layout"], "feature_dims": ()})
    assert layout.view_params == 5  # dy, dx, flip and the cutout's centre: the cached views hold their holes
    cache = tc.TeacherCache(cache_dir, layout, {})
    # the views the student stage picks in some epoch, reconstructed the way the trainer does
    params, view_of = cache.views_for_epoch(recipe.seed, 3)
    assert set(view_of.tolist()) == {0, 1, 2}
    idx = torch.arange(0, 40)
    x = augment(data.train.images[idx], params[idx], recipe.data.augment_config, data.image_size)
    live = _live(teachers, rt.to_pixels(x))
    stored, _ = cache.targets(idx, view_of[idx], torch.device("cpu"))
    assert stored.shape == live.shape == (2, 40, 4)
    scale = live.abs().max().item()
    assert torch.allclose(stored, live, rtol=2e-3, atol=2e-3 * scale), (stored - live).abs().max()
    # a different view of the same images gives different outputs: the comparison above can fail
    other = (view_of[idx] + 1) % 3
    assert not torch.allclose(cache.targets(idx, other, torch.device("cpu"))[0], live, atol=1e-4)


def test_features_are_cached_for_feature_matching(cached_run, tmp_path):
    run_path, recipe = cached_run
    data, teachers, rt = _setup(run_path, recipe)

    def with_features(px):
        with torch.no_grad():
            outs = [t.forward_with_features(px) for t in teachers]
        return torch.stack([o[0] for o in outs]), [o[1] for o in outs]

    cache = tc.open_teacher_cache(recipe.distill.teacher_cache, tmp_path, teachers, data, recipe.data.augment_config,
                                  rt, with_features, True, lambda s: None)
    assert [f.shape[-1] for f in cache.features] == [t.num_features for t in teachers]
    params, view_of = cache.views_for_epoch(5, 0)
    idx = torch.arange(8, 24)
    x = augment(data.train.images[idx], params[idx], recipe.data.augment_config, data.image_size)
    live_logits, live_feats = with_features(rt.to_pixels(x))
    logits, feats = cache.targets(idx, view_of[idx], torch.device("cpu"))
    for stored, live in zip([logits, *feats], [live_logits, *live_feats]):
        assert torch.allclose(stored, live, rtol=2e-3, atol=2e-3 * live.abs().max().item())
    # features are part of the key: the logits-only cache of the same run is another folder
    assert cache.folder.name != Path(json.loads((run_path / "metrics.json").read_text())["teacher_cache"]["path"]).name


def test_a_reduced_precision_run_reads_a_complete_fp32_cache_and_never_the_reverse(cached_run, tmp_path):
    run_path, recipe = cached_run
    data, teachers, rt = _setup(run_path, recipe)
    aug, said = recipe.data.augment_config, []
    fp32_folder = Path(json.loads((run_path / "metrics.json").read_text())["teacher_cache"]["path"])
    bf16 = Runtime(torch.device("cpu"), torch.bfloat16, False)

    def never(px):
        raise AssertionError("the teachers ran")

    for path in (run_path / "teacher_cache", fp32_folder):  # the folder of caches, or the cache's own folder
        cfg = recipe.distill.teacher_cache.model_copy(update={"path": str(path)})
        cache = tc.open_teacher_cache(cfg, tmp_path, teachers, data, aug, bf16, never, False, said.append)
        assert cache.folder == fp32_folder and "reading the complete fp32 cache" in said[-1]
    calls = []

    def live(px):
        calls.append(len(px))
        return _live(teachers, px), None

    cfg = recipe.distill.teacher_cache.model_copy(update={"path": str(tmp_path / "caches")})
    built = tc.open_teacher_cache(cfg, tmp_path, teachers, data, aug, bf16, live, False, said.append)
    assert calls and json.loads((built.folder / "key.json").read_text())["doc"]["precision"] == "bf16 autocast"
    calls.clear()  # an fp32 run beside only a bf16 cache builds its own: bf16 outputs are not what it would compute
    own = tc.open_teacher_cache(cfg, tmp_path, teachers, data, aug, rt, live, False, said.append)
    assert calls and own.folder != built.folder


def test_the_key_changes_with_teachers_split_augmentation_views_seed_and_decoder(cached_run, monkeypatch):
    run_path, recipe = cached_run
    data, teachers, rt = _setup(run_path, recipe)
    cfg, aug = recipe.distill.teacher_cache, recipe.data.augment_config

    def key(teachers=teachers, data=data, aug=aug, cfg=cfg, precision="fp32"):
        return tc.cache_key(teachers, data, aug, cfg, precision, False)[0]

    base = key()
    assert key() == base  # deterministic
    changed = {}
    with torch.no_grad():
        p = next(teachers[0].model.parameters())
        p[0].flatten()[0] += 1e-3
        changed["teacher weights"] = key()
        p[0].flatten()[0] -= 1e-3
    data.train.images[0, 0, 0, 0] ^= 1
    changed["split"] = key()
    data.train.images[0, 0, 0, 0] ^= 1
    changed["augmentation"] = key(aug=aug.model_copy(update={"crop_padding": 3}))
    changed["cutout"] = key(aug=aug.model_copy(update={"cutout": 5}))
    # a cache built before cutout existed hashed the augmentation without that key: without cutout, so does this
    plain = aug.model_copy(update={"cutout": 0})
    before = {k: v for k, v in plain.model_dump().items() if k != "cutout"}
    assert tc.cache_key(teachers, data, plain, cfg, "fp32", False)[1]["augment"] == before
    changed["views"] = key(cfg=cfg.model_copy(update={"views": 4}))
    changed["seed"] = key(cfg=cfg.model_copy(update={"seed": 1}))
    changed["precision"] = key(precision="bf16 autocast")
    monkeypatch.setattr(tc, "DECODER_VERSION", tc.DECODER_VERSION + 1)  # files known by name decode otherwise now
    changed["decoder"] = key()
    monkeypatch.undo()
    assert key() == base
    assert all(k != base for k in changed.values()), [n for n, k in changed.items() if k == base]
    assert len(set(changed.values())) == len(changed)


def test_a_second_run_reuses_the_cache_without_running_the_teachers(cached_run, tmp_path, monkeypatch):
    run_path, recipe = cached_run
    calls = []
    real = Distiller.teacher_targets
    monkeypatch.setattr(Distiller, "teacher_targets", lambda self, px: (calls.append(len(px)), real(self, px))[1])
    shared = str((run_path / "teacher_cache").resolve())
    for mode in ("ekd", "avg_kd"):  # every mode that reads teachers uses it
        raw = apply_overrides(recipe.model_dump(mode="json"), ["name=second", f"distill.teacher_cache.path={shared}",
                                                                 f"mode={mode}"])
        for t in raw["teachers"]:  # the first run's teachers, loaded from its checkpoints
            t.update(weights=str(run_path / "teachers" / f"{t['name']}.pt"), train=None)
        r = recipe_from_dict(raw)
        m = json.loads((distill(r, tmp_path / mode, progress=False).path / "metrics.json").read_text())
        assert m["teacher_cache"]["path"].startswith(shared) and m["mode"] == mode
    assert calls == []
    # with the cache off, the same run calls the teachers every step
    r = recipe_from_dict(apply_overrides(r.model_dump(mode="json"), ["distill.teacher_cache.views=0"]))
    distill(r, tmp_path / "live", progress=False)
    assert sum(calls) >= 96


def _build(folder: Path, recipe, data, teachers, rt, targets=None):
    return tc.open_teacher_cache(recipe.distill.teacher_cache, folder, teachers, data, recipe.data.augment_config,
                                 rt, targets or (lambda px: (_live(teachers, px), None)), False, lambda s: None)


KILL_SCRIPT = """
import sys, time, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_teacher_cache as t
from ekdc import load_recipe
from ekdc.distillation import teacher_cache as tc
tc.CHUNK = 16
recipe = load_recipe({recipe!r})
data, teachers, rt = t._setup({run!r}, recipe)
def slow(px):
    time.sleep(0.15)
    return t._live(teachers, px), None
t._build(Path({folder!r}), recipe, data, teachers, rt, slow)
"""


def test_an_interrupted_build_resumes_after_kill_9(cached_run, tmp_path, monkeypatch):
    run_path, recipe = cached_run
    data, teachers, rt = _setup(run_path, recipe)
    monkeypatch.setattr(tc, "CHUNK", 16)  # 120 images: 8 chunks
    (tmp_path / "r.yaml").write_text(json.dumps(recipe.model_dump(mode="json")))
    script = KILL_SCRIPT.format(tests=str(ROOT / "tests"), recipe=str(tmp_path / "r.yaml"), run=str(run_path),
                                folder=str(tmp_path / "killed"))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    done_files = lambda: list((tmp_path / "killed").glob("teacher_cache/*/done"))  # noqa: E731
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (done_files() and 2 <= sum(done_files()[0].read_bytes()) < 8):
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = done_files()[0].parent
    finished_before = sum((folder / "done").read_bytes())
    assert 2 <= finished_before < 8 and not (folder / "complete.json").exists()
    calls = []
    resumed = _build(tmp_path / "killed", recipe, data, teachers, rt,
                     lambda px: (calls.append(1), (_live(teachers, px), None))[1])
    assert len(calls) == (8 - finished_before) * 3  # only the chunks not done, in every view
    # the build's time counts the killed process's chunks too (each took 3 x 0.15 s there)
    assert json.loads((folder / "complete.json").read_text())["build_seconds"] >= 0.45 * finished_before
    fresh = _build(tmp_path / "fresh", recipe, data, teachers, rt)
    assert np.array_equal(np.asarray(resumed.logits), np.asarray(fresh.logits))


def test_refusals_name_what_is_wrong(cached_run, tmp_path, monkeypatch):
    run_path, recipe = cached_run
    data, teachers, rt = _setup(run_path, recipe)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(tc.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(UserError, match=r"needs \d+\.\d KiB on its disk, and 1000 bytes is free"):
        _build(tmp_path / "full", recipe, data, teachers, rt)
    monkeypatch.setattr(tc.shutil, "disk_usage", real_usage)
    # a path naming one cache's folder must hold this key: a cache for other views is refused, not read
    folder = Path(json.loads((run_path / "metrics.json").read_text())["teacher_cache"]["path"])
    other = recipe.model_copy(deep=True)
    other.distill.teacher_cache.views, other.distill.teacher_cache.path = 4, str(folder)
    with pytest.raises(UserError, match="made for other views"):
        _build(tmp_path, other, data, teachers, rt)
    # damaged files are named
    broken = tmp_path / "broken"
    shutil.copytree(folder.parent, broken / "teacher_cache")
    with open(next(broken.glob("teacher_cache/*/logits.f16")), "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(UserError, match="damaged: logits.f16"):
        _build(broken, recipe, data, teachers, rt)
    for name, garbage in (("complete.json", b"[1, 2]"), ("views.npy", b"\x93NUMPY")):
        target = next(broken.glob(f"teacher_cache/*/{name}"))
        shutil.rmtree(broken)
        shutil.copytree(folder.parent, broken / "teacher_cache")
        target.write_bytes(garbage)
        with pytest.raises(UserError, match="damaged"):
            _build(broken, recipe, data, teachers, rt)


def test_a_damaged_partial_build_is_built_again_not_resumed(cached_run, tmp_path, monkeypatch):
    """A short file mapped for writing would grow back with zeros, under chunks marked done."""
    run_path, recipe = cached_run
    data, teachers, rt = _setup(run_path, recipe)
    monkeypatch.setattr(tc, "CHUNK", 16)
    calls = []

    def stop_after_two_chunks(px):
        calls.append(1)
        if len(calls) > 2 * 3:
            raise KeyboardInterrupt
        return _live(teachers, px), None

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "partial", recipe, data, teachers, rt, stop_after_two_chunks)
    folder = next((tmp_path / "partial").glob("teacher_cache/*"))
    assert sum((folder / "done").read_bytes()) == 2
    with open(folder / "logits.f16", "r+b") as fh:
        fh.truncate(100)
    resumed = _build(tmp_path / "partial", recipe, data, teachers, rt)
    fresh = _build(tmp_path / "fresh", recipe, data, teachers, rt)
    assert np.array_equal(np.asarray(resumed.logits), np.asarray(fresh.logits))


def test_streamed_and_in_memory_folders_cache_the_same_outputs_for_resized_crops(tmp_path):
    """Views are reconstructed from (cache seed, view, index) alone: either loader gives the same cache."""
    from ekdc.data import load_data
    from ekdc.recipe import Augment, DataConfig, TeacherCacheConfig, TeacherConfig
    from ekdc.teachers import Teacher, trainable_teacher
    from test_stream import _folder

    root = _folder(tmp_path / "data", per_class=10, size=(30, 22))
    aug = {"kind": "resized_crop", "scale": [0.3, 1.0]}
    rt = setup_runtime("cpu", "fp32", False)
    caches = []
    for loader in ("memory", "stream"):
        data = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=16, val_per_class=2,
                                    loader=loader, workers=2, augment=aug))
        info = DataInfo(list(data.classes), data.image_size, list(data.mean), list(data.std))
        torch.manual_seed(0)
        t = trainable_teacher(TeacherConfig(arch="resnet8"), 0, info)
        teachers = [Teacher(t.model, t.pre, name="resnet8", arch="resnet8", source="ekdc", head=t.head)]
        caches.append(tc.open_teacher_cache(TeacherCacheConfig(views=3), tmp_path / loader, teachers, data,
                                            Augment(**aug), rt, lambda px: (_live(teachers, px), None), False,
                                            lambda s: None))
    mem, st = caches
    assert np.array_equal(np.asarray(mem.view_params), np.asarray(st.view_params))
    assert np.allclose(np.asarray(mem.logits, np.float32), np.asarray(st.logits, np.float32), atol=1e-2)


def test_views_without_augmentation_are_refused_in_one_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", data={"augment": False}, distill={**DISTILL, "teacher_cache": {"views": 4}})
    res = run_cli("distill", path, "--out", tmp_path / "run")
    assert res.returncode == 2 and "set views: 1" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes_build_and_read_one_cache(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", device="cpu", mode="avg_kd", distill={**DISTILL, **CACHE})
    res = torchrun_distill(recipe, tmp_path / "run")
    assert res.returncode == 0, ranks_said(res.stderr)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["teacher_cache"]["views"] == 3
    folder = Path(m["teacher_cache"]["path"])
    assert all((folder / "done").read_bytes()) and (folder / "complete.json").exists()


def test_an_onnx_teacher_runs_once_per_view_and_its_file_is_in_the_key(tmp_path, monkeypatch):
    """ONNX teachers (run by ONNX Runtime) are what the cache makes cheap; their file's bytes key it."""
    import yaml

    from test_teachers import export_foreign, onnx_entry
    from ekdc.teachers.onnx_model import OnnxModel

    onnx_file = export_foreign(tmp_path / "foreign.onnx")
    r = tiny_recipe(mode="avg_kd")
    r["teachers"] = [{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}, onnx_entry(onnx_file)]
    r["distill"] = {**DISTILL, **CACHE}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    calls = []
    real = OnnxModel.forward
    monkeypatch.setattr(OnnxModel, "forward", lambda self, x: (calls.append(len(x)), real(self, x))[1])
    recipe = load_recipe(tmp_path / "r.yaml")
    run = distill(recipe, tmp_path / "run", progress=False)
    m = json.loads((run.path / "metrics.json").read_text())
    n_train, n_val = m["train_images"], m["val_images"]
    # the build's 3 views of every training image, then the validation metrics: never once a step
    assert sum(calls) == 3 * n_train + n_val
    data, teachers, rt = _setup(run.path, recipe)
    cfg, aug = recipe.distill.teacher_cache, recipe.data.augment_config
    before = tc.cache_key(teachers, data, aug, cfg, "fp32", False)[0]
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")  # the same graph, another file: a new key, to be safe
    assert tc.cache_key(teachers, data, aug, cfg, "fp32", False)[0] != before
