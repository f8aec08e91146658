"""The streaming loader: image folders decoded batch by batch in worker processes give the very batches
the in-memory loader gives, so runs, resumes and DDP shards agree whichever loader a folder gets."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ekdc.data import iterate_batches, load_data
from ekdc.recipe import DataConfig
from tests.conftest import ROOT, kill_9_during, run_cli, tiny_recipe


def _folder(root, per_class=12, size=(20, 14)):
    """Class folders with nested subfolders and odd image modes (RGBA, L, P, CMYK)."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "RGBA", "L", "P", "CMYK"]
    for c in range(4):
        for i in range(per_class):
            sub = root / f"class_{c}" / ("a" if i % 2 else "b")
            sub.mkdir(parents=True, exist_ok=True)
            base = np.full((*size[::-1], 3), 60 * c, np.uint8) + rng.integers(0, 40, (*size[::-1], 3), dtype=np.uint8)
            im = Image.fromarray(base).convert(modes[i % len(modes)])
            im.save(sub / f"{i}.{'jpg' if im.mode in ('RGB', 'L', 'CMYK') else 'png'}")
    return root


def test_stream_and_memory_give_the_same_batches(tmp_path):
    root = _folder(tmp_path / "data")
    cfg = dict(dataset="imagefolder", root=str(root), image_size=16, val_per_class=3)
    mem = load_data(DataConfig(**cfg, loader="memory"))
    st = load_data(DataConfig(**cfg, loader="stream", workers=2))
    assert (mem.loader, st.loader) == ("memory", "stream") and st.train.streamed
    assert mem.mean == st.mean and torch.equal(mem.train_y, st.train_y)  # 36 images: the sample is the split
    order = torch.randperm(len(mem.train), generator=torch.Generator().manual_seed(3))
    batches = list(iterate_batches(len(order), 8, order))
    for (a, ia), (b, ib) in zip(mem.train.batches(batches), st.train.batches(batches)):
        assert torch.equal(ia, ib) and torch.equal(a, b)
    auto = load_data(DataConfig(**cfg, memory_budget_gb=1e-6))  # a budget nothing fits: auto streams
    assert auto.loader == "stream"


def _recipe(tmp_path, root, loader, **over):
    r = tiny_recipe(**over)
    r["data"] = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "val_per_class": 3,
                 "loader": loader, "workers": 1, "augment": True}
    p = tmp_path / f"{loader}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_a_run_is_the_same_with_either_loader(tmp_path):
    root = _folder(tmp_path / "data")
    metrics = {}
    for loader in ("memory", "stream"):
        res = run_cli("distill", _recipe(tmp_path, root, loader), "--out", tmp_path / loader, "-q")
        assert res.returncode == 0, res.stderr
        metrics[loader] = json.loads((tmp_path / loader / "metrics.json").read_text())
    assert metrics["stream"]["loader"] == "stream"
    for key in ("student", "teachers", "teacher_ensemble_acc"):
        assert metrics["memory"][key] == metrics["stream"][key]


def test_a_corrupt_file_is_named_in_one_line(tmp_path):
    root = _folder(tmp_path / "data")
    bad = root / "class_1" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    res = run_cli("distill", _recipe(tmp_path, root, "stream"), "--out", tmp_path / "run")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in res.stderr


@pytest.mark.slow
def test_kill_9_then_resume_with_the_stream_loader(tmp_path):
    root = _folder(tmp_path / "data", per_class=30)
    over = dict(teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 16}}],
                distill={"epochs": 5, "batch_size": 16, "lr": 0.05})
    recipe = _recipe(tmp_path, root, "stream", **over)
    assert run_cli("distill", recipe, "--out", tmp_path / "ref", "-q").returncode == 0
    run = tmp_path / "killed"
    kill_9_during(recipe, run, "student-ekd", 2)
    res = run_cli("distill", recipe, "--out", run, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "ref", run))
    assert a["student"] == b["student"]  # fp32 on CPU, the same batches: the resumed run retraces the first


def test_skip_bad_files_leaves_them_out_and_counts_them(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "class_2" / "a" / "zz_broken.png").write_bytes(b"\x89PNG not really")
    (root / "class_0" / "b" / "zz_empty.jpg").write_bytes(b"")
    cfg = dict(dataset="imagefolder", root=str(root), image_size=16, val_per_class=3)
    with pytest.raises(Exception, match="zz_"):  # by default the first one stops the run, named
        load_data(DataConfig(**cfg, loader="memory"))
    d = load_data(DataConfig(**cfg, loader="memory", skip_bad_files=True))
    assert d.skipped_files == 2 and len(d.train) + len(d.val) == 4 * 12


def test_resized_crop_view_is_exact_at_scale_one_and_flips():
    from ekdc.data import resized_crop_batch

    x = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8)
    full = torch.tensor([[0, 0, 20, 20, 0], [0, 0, 20, 20, 1], [0, 0, 20, 20, 0]], dtype=torch.float32)
    out = resized_crop_batch(x, full, 20)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1)) and torch.equal(out[2], x[2])
    corner = resized_crop_batch(x[:1], torch.tensor([[0, 0, 10, 10, 0]], dtype=torch.float32), 5)
    assert torch.allclose(corner[0].float(), torch.nn.functional.avg_pool2d(x[:1, :, :10, :10].float(), 2)[0], atol=1)


def test_photo_sized_data_trains_on_resized_crops_and_evaluates_on_the_centre(tmp_path):
    """Above 64 px (or with augment.kind: resized_crop) images decode at size / 0.875; training takes
    RandomResizedCrop views drawn per (seed, epoch, index), the same in both loaders; evaluation, export
    and infer.py take the centre crop."""
    from ekdc.data import augment, augment_params, canonical_size

    root = _folder(tmp_path / "data", size=(40, 30))
    cfg = dict(dataset="imagefolder", root=str(root), image_size=24, val_per_class=3,
               augment={"kind": "resized_crop", "scale": [0.3, 1.0]})
    mem = load_data(DataConfig(**cfg, loader="memory"))
    st = load_data(DataConfig(**cfg, loader="stream", workers=2))
    side = canonical_size(24, "resized_crop")
    assert side == 27 and mem.train_x.shape[-1] == side and mem.val_x.shape[-1] == 24
    aug = DataConfig(**cfg).augment_config
    params = augment_params(len(mem.train), aug, seed=0, epoch=1, side=side)
    assert torch.equal(params, augment_params(len(mem.train), aug, seed=0, epoch=1, side=side))
    batches = list(iterate_batches(len(mem.train), 8))
    for (a, ia), (b, _) in zip(mem.train.batches(batches), st.train.batches(batches)):
        assert torch.equal(augment(a, params[ia], aug, 24), augment(b, params[ia], aug, 24))
    val_batches = list(iterate_batches(len(mem.val), 8))
    for (a, _), (b, _) in zip(mem.val.batches(val_batches), st.val.batches(val_batches)):
        assert torch.equal(a, b) and a.shape[-1] == 24
    assert DataConfig(dataset="imagefolder", root=str(root), image_size=72).augment_config.kind == "resized_crop"


def test_end_to_end_at_72_px(tmp_path):
    """distill -> export -> bench at 72 px: streamed folder, resized crops, imagenet stem, inverted
    residual blocks, small teachers; infer.py feeds a photo of another shape as evaluation did."""
    root = _folder(tmp_path / "data", size=(90, 70))
    r = tiny_recipe()
    r["data"] = {"dataset": "imagefolder", "root": str(root), "image_size": 72, "val_per_class": 3, "loader": "stream",
                 "workers": 1}
    r["teachers"] = [{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 16}},
                     {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 16}}]
    r["student"] = {"trunk_width": 8, "branch_widths": [8, 16], "block": "inverted_residual", "expand_ratio": 2}
    r["distill"] = {"epochs": 1, "batch_size": 16}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert run_cli("distill", tmp_path / "r.yaml", "--out", tmp_path / "run", "-q").returncode == 0
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["student"]["stem"] == "imagenet"
    res = run_cli("export", tmp_path / "run", "--out", tmp_path / "export", "--int8", "--calib", "16")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["files"][0]["parity"]["argmax_agreement"] == 1.0
    meta = {p.key: p.value for p in __import__("onnx").load(str(tmp_path / "export" / "student.onnx")).metadata_props}
    assert json.loads(meta["ekdc.preprocess"]) == {"exif_orientation": True, "resize_shorter": 82, "center_crop": 72,
                                                 "max_aspect": 4}
    res = run_cli("bench", tmp_path / "export" / "student.onnx", "--batch", "1", "--runs", "2", "--repeats", "1",
                  "--json", tmp_path / "b.json")
    assert res.returncode == 0, res.stderr
    assert all(m["accuracy"] is not None for m in json.loads((tmp_path / "b.json").read_text())["models"])
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (130, 90), (200, 30, 30)).save(photo)
    res = subprocess.run([sys.executable, str(ROOT / "export" / "infer.py"), str(tmp_path / "export" / "student.onnx"),
                          str(photo)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith(str(photo)), res.stderr
