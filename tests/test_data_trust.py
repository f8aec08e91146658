"""Data you can trust: the scan never relabels, the decoder never blanks, nothing invents a class, a
decompression bomb is one line, and a plan that cannot succeed fails before the teachers train."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ekdc import UserError, distill, load_recipe
from ekdc.data import load_data
from ekdc.data.decode import decode_image, to_rgb

from conftest import ROOT, run_cli, tiny_recipe, write_recipe


def _img(path: Path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "img"
    for i in range(6):
        _img(root / "cat" / f"c{i}.png", i)
        _img(root / "dog" / f"d{i}.png", 100 + i)
    return root


def _data(root: Path, **over):
    raw = tiny_recipe(data={"dataset": "imagefolder", "root": str(root), "image_size": 12, "val_per_class": 1, **over})
    return load_recipe_from(raw).data


def load_recipe_from(raw):
    from ekdc.recipe import recipe_from_dict

    return recipe_from_dict(raw)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_symlink_loop_never_relabels(folder, loader):
    os.symlink("..", folder / "dog" / "loop")  # dog/loop/cat/... would be cat's images labelled dog
    d = load_data(_data(folder, loader=loader, workers=0))
    assert len(d.train) + len(d.val) == 12  # each image once, not 18
    assert [p.kind for p in d.problems] == ["loop"]


def test_links_into_another_class_are_not_followed_and_outside_ones_are(folder, tmp_path):
    os.symlink(folder / "cat", folder / "dog" / "cats")
    os.symlink(folder / "cat" / "c0.png", folder / "dog" / "c0-as-dog.png")
    extra = tmp_path / "extra"
    _img(extra / "d9.png", 109)
    os.symlink(extra, folder / "dog" / "more")  # data linked in from outside the root: followed
    d = load_data(_data(folder))
    labels = torch.cat([d.train_y, d.val_y]).tolist()
    assert labels.count(0) == 6 and labels.count(1) == 7
    assert sorted(p.kind for p in d.problems) == ["other_class_link", "other_class_link"]


def test_an_empty_class_folder_is_not_a_class(folder, tmp_path):
    (folder / "empty").mkdir()
    (folder / "empty" / "notes.txt").write_text("no images here")
    d = load_data(_data(folder))
    assert d.classes == ["cat", "dog"] and [p.kind for p in d.problems] == ["not_image", "empty_class"]
    res = run_cli("data", "check", folder)
    assert res.returncode == 1 and "WRONG: empty_class" in res.stdout and str(folder / "empty") in res.stdout


def test_one_class_left_after_unreadable_files_is_refused_by_shard_and_distill(folder, tmp_path):
    """Two class folders, one of them only unreadable files: with those left out one class is left, which
    trains and scores 100% while learning nothing. data shard and distill (skip_bad_files) refuse it."""
    for f in (folder / "dog").iterdir():
        f.write_bytes(b"not an image")
    res = run_cli("data", "shard", folder, tmp_path / "sh")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "only class 'cat' has an image that can be packed" in lines[0]
    assert not (tmp_path / "sh").exists()
    with pytest.raises(UserError, match=r"one class \(cat\): a classifier needs at least 2"):
        load_data(_data(folder, skip_bad_files=True))


def test_a_validation_folder_or_shard_set_holding_training_files_is_refused(folder, tmp_path):
    """data.val_root naming the training folder (by another path) or data.val_urls the training shards would
    score the model on what it trained on: refused, by distill and data check alike."""
    same = write_recipe(tmp_path / "same.yaml", data={"dataset": "imagefolder", "root": str(folder), "image_size": 12,
                                                       "val_root": str(folder / ".." / folder.name)})
    res = run_cli("data", "shard", folder, tmp_path / "sh")
    assert res.returncode == 0, res.stderr
    shard = str(tmp_path / "sh" / "shard-000000.tar")
    shards = write_recipe(tmp_path / "r.yaml", data={"dataset": "webdataset", "urls": shard, "val_urls": shard,
                                                      "image_size": 12})
    for cmd, words in [(["data", "check", same], "data.val_root: the validation data holds 12 of the training data's 12 files"),
                       (["distill", same, "--out", tmp_path / "run"], "data.val_root: the validation data holds 12"),
                       (["distill", shards, "--out", tmp_path / "run"],
                        "data.val_urls: the validation data holds 1 of the training data's 1 shards")]:
        res = run_cli(*cmd)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert words in lines[0]
    assert not (tmp_path / "run").exists()


def test_files_it_does_not_read_and_broken_links_are_named(folder, tmp_path):
    Image.new("RGB", (12, 12)).save(folder / "cat" / "c9.gif")
    for i in range(25):  # many of one kind: data check shows 20 and counts the rest
        (folder / "dog" / f"n{i:02d}.txt").write_text("x")
    os.symlink(tmp_path / "nowhere.png", folder / "cat" / "gone.png")
    os.symlink(folder / "dog" / "was-here.png", folder / "cat" / "gone-too.png")  # dead, into another class
    os.mkfifo(folder / "dog" / "pipe.png")
    d = load_data(_data(folder))
    assert len(d.train) + len(d.val) == 12
    kinds = [p.kind for p in d.problems]
    assert kinds.count("broken_link") == 2 and kinds.count("not_image") == 27 and len(kinds) == 29
    res = run_cli("data", "check", folder, "--json", tmp_path / "check.json")
    assert res.returncode == 0 and "no problem found" in res.stdout, res.stdout  # notes: training leaves them out
    assert f"note: not_image: {folder / 'cat' / 'c9.gif'}: .gif is not an image ekdc reads" in res.stdout
    assert f"note: broken_link: {folder / 'cat' / 'gone.png'}" in res.stdout
    assert "not_image: 7 more (--json lists them all)" in res.stdout
    assert len(json.loads((tmp_path / "check.json").read_text())["problems"]) == 29


def test_data_check_reports_and_exits(folder):
    (folder / "dog" / "d0-copy.png").write_bytes((folder / "dog" / "d0.png").read_bytes())  # same class: a note
    (folder / "cat" / "bad.png").write_bytes(b"not a png")
    res = run_cli("data", "check", folder, "--json", folder.parent / "check.json")
    # distill stops at the unreadable file (data.skip_bad_files is off by default): that is wrong
    assert res.returncode == 1 and "WRONG: unreadable" in res.stdout and "skip_bad_files" in res.stdout, res.stdout
    r = json.loads((folder.parent / "check.json").read_text())
    assert [c["images"] for c in r["classes"]] == [7, 7] and r["wrong"] is True
    assert [p["kind"] for p in r["problems"]] == ["unreadable"]
    assert len(r["identical"]) == 1 and not r["identical"][0]["wrong"]
    assert [u["path"] for u in r["unreadable"]] == [str(folder / "cat" / "bad.png")]
    assert r["modes"] == {"RGB": 13} and r["smallest"] == [12, 12]
    (folder / "cat" / "bad.png").unlink()
    res = run_cli("data", "check", folder)
    assert res.returncode == 0 and "no problem found" in res.stdout, res.stdout  # a same-class copy is a note
    res = run_cli("data", "check", folder, "--json", folder / "cat" / "check.json")
    assert res.returncode == 2 and "lies inside the checked folder" in res.stderr  # never written into the data
    assert not (folder / "cat" / "check.json").exists()
    (folder / "cat" / "d1-as-cat.png").write_bytes((folder / "dog" / "d1.png").read_bytes())  # two labels, one image
    res = run_cli("data", "check", folder)
    assert res.returncode == 1 and "identical files in classes cat, dog" in res.stdout


def test_data_check_names_each_encoding_with_a_jpegs_quality_and_chroma_subsampling(folder, tmp_path):
    from ekdc.data.decode import check_image, jpeg_quality

    rng = np.random.default_rng(0)
    im = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))
    im.save(folder / "cat" / "a.jpg", quality=75)  # Pillow's default: colour at half resolution
    im.save(folder / "cat" / "b.jpg", quality=75)
    im.save(folder / "dog" / "c.jpg", quality=95, subsampling=0)
    im.convert("L").save(folder / "dog" / "d.jpg", quality=40)
    custom = [min(255, 3 + i) for i in range(64)]  # tables of the encoder's own, no libjpeg quality
    im.save(folder / "dog" / "e.jpg", qtables=[custom, custom], subsampling=1)
    res = run_cli("data", "check", folder, "--json", tmp_path / "check.json")
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads((tmp_path / "check.json").read_text())
    assert r["encodings"] == {"PNG": 12, "JPEG q75 4:2:0": 2, "JPEG q95 4:4:4": 1, "JPEG q40": 1,
                              f"JPEG {jpeg_quality(custom)} 4:2:2": 1}
    assert jpeg_quality(custom).startswith("~q")  # the nearest, said to be approximate
    assert "encodings: PNG 12, JPEG q75 4:2:0 2," in res.stdout
    assert check_image(str(folder / "cat" / "a.jpg")).encoding == "JPEG q75 4:2:0"
    # every quality libjpeg writes is read back as itself
    for q in (1, 10, 49, 50, 51, 90, 100):
        im.save(tmp_path / "q.jpg", quality=q)
        assert check_image(str(tmp_path / "q.jpg")).encoding.split()[1] == f"q{q}"


def _sixteen_bit(tmp_path: Path) -> tuple[Path, Path]:
    g = (np.linspace(0, 1, 20 * 20).reshape(20, 20) * 65535).astype(np.uint16)
    p16, p8 = tmp_path / "g16.png", tmp_path / "g8.png"
    Image.fromarray(g).save(p16)  # Pillow writes (and opens) it as I;16
    Image.fromarray(np.rint(g / 257).astype(np.uint8), "L").save(p8)
    return p16, p8


def test_sixteen_bit_and_float_images_keep_their_range(tmp_path):
    p16, p8 = _sixteen_bit(tmp_path)
    with Image.open(p16) as im:
        assert im.mode.startswith("I;16")
    a, b = decode_image(str(p16), 20), decode_image(str(p8), 20)
    assert a.float().mean() > 100 and (a.int() - b.int()).abs().max() <= 1  # not clipped to white
    f = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "F")
    assert np.asarray(to_rgb(f))[..., 0].max() == 255 and np.asarray(to_rgb(f))[..., 0].min() == 0
    i32 = Image.fromarray(np.full((4, 4), 30000, dtype=np.int32), "I")
    assert np.asarray(to_rgb(i32))[0, 0, 0] == round(30000 * 255 / 65535)
    with pytest.raises(ValueError, match="image mode 'HSV' is not one ekdc decodes"):
        to_rgb(Image.new("HSV", (2, 2)))


def test_infer_script_decodes_as_training_does(tmp_path):
    spec = importlib.util.spec_from_file_location("infer", ROOT / "export" / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    p16, _ = _sixteen_bit(tmp_path)
    rgba = tmp_path / "p.png"
    Image.new("P", (9, 7), 3).save(rgba)
    for p in (p16, rgba):
        ours = decode_image(str(p), 16).float().numpy() / 255
        theirs = infer.load_images([str(p)], 16, {"resize": 16})[0]
        assert np.abs(ours - theirs).max() < 1e-6


def test_infer_script_follows_the_metadata_for_photos_and_strips(tmp_path):
    """A photo's view (shorter side, centre, centre crop) and a strip past max_aspect (its centre square
    first): infer.py, reading only the metadata ekdc writes, decodes as ekdc evaluates."""
    import types

    from ekdc.data.decode import canonical_size, center_crop, eval_preprocess

    spec = importlib.util.spec_from_file_location("infer", ROOT / "export" / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    pre = eval_preprocess(types.SimpleNamespace(view="resized_crop", image_size=56))
    rng = np.random.default_rng(0)
    for w, h in ((400, 60), (60, 300), (200, 60), (90, 130)):  # strips past 4:1 either way, and two photos
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        ours = center_crop(decode_image(str(path), 56, view="resized_crop"), 56).float().numpy() / 255
        assert ours.shape[-1] == 56 and canonical_size(56, "resized_crop") == pre["resize_shorter"]
        theirs = infer.load_images([str(path)], 56, pre)[0]
        assert np.abs(ours - theirs).max() < 1e-6, (w, h)


def test_a_photo_is_decoded_upright_by_its_exif_orientation(tmp_path):
    """A phone's photo stores its pixels sideways and says so in EXIF: training, evaluation and infer.py all
    take it as a viewer shows it (a deployed client, a browser, does too)."""
    spec = importlib.util.spec_from_file_location("infer", ROOT / "export" / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8, 0] = 255  # stored: red on the left, blue on the right
    pixels[:, 8:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 3  # "rotated 180 degrees": shown with blue on the left
    turned, plain = tmp_path / "turned.jpg", tmp_path / "plain.jpg"
    Image.fromarray(pixels).save(turned, exif=exif, quality=95)
    Image.fromarray(pixels).save(plain, quality=95)
    for path, left_is_blue in ((turned, True), (plain, False)):
        x = decode_image(str(path), 16)  # uint8 [3,16,16]
        assert (x[2, :, :4].float().mean() > x[0, :, :4].float().mean()) == left_is_blue
        theirs = infer.load_images([str(path)], 16, {"exif_orientation": True, "resize": 16})[0]
        assert np.abs(x.float().numpy() / 255 - theirs).max() < 1e-6


def _bomb(path: Path, side: int = 20000) -> None:
    """A PNG whose header says side x side pixels: Pillow refuses it on opening, before any decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line_and_skipped_when_asked(folder, tmp_path):
    _bomb(folder / "cat" / "bomb.png")
    recipe = write_recipe(tmp_path / "r.yaml", data={"dataset": "imagefolder", "root": str(folder), "image_size": 12,
                                                     "val_per_class": 1}, distill={"epochs": 1, "batch_size": 4})
    res = run_cli("distill", recipe, "--out", tmp_path / "run", "-q")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot read image" in res.stderr and "bomb.png" in res.stderr and "decompression bomb" in res.stderr
    d = load_data(_data(folder, skip_bad_files=True))
    assert d.skipped_files == 1 and len(d.train) + len(d.val) == 12


def test_an_impossible_budget_fails_before_the_teachers_and_resumes_with_a_new_one(tmp_path, monkeypatch):
    import ekdc.plan.candidates as candidates_mod

    # widths of 8, not 4: torch 2.14's oneDNN convolution backward double-frees on 4-channel convolutions with one
    # intra-op thread (gdb: mkldnn_convolution_backward_weights), as pytest -n workers run
    small = {"trunk_width": 8, "trunk_blocks": 1, "branch_widths": [8, 8], "branch_blocks": 1, "block": "basic"}
    monkeypatch.setattr(candidates_mod, "default_candidates", lambda *_: [small])
    raw = tiny_recipe(teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}])
    raw["student"] = {"latency_ms": 0.0001}
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="no student meets 0.0001 ms"):
        distill(load_recipe(path), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "teachers" / "resnet8.pt").exists()  # nothing expensive happened
    run = distill(load_recipe(path, ["student.latency_ms=1000"]), tmp_path / "run", resume=True, progress=False)
    assert run.metrics()["plan"]["budget_ms"] == 1000 and run.recipe().student.latency_ms == 1000
    # teachers trained, then a new budget for the student: the teachers are not trained again
    run.student_path.unlink()
    run.metrics_path.unlink()
    epochs = lambda: sum('"teacher-resnet8"' in line for line in run.log_path.read_text().splitlines())  # noqa: E731
    before = epochs()
    distill(load_recipe(path, ["student.latency_ms=2000"]), tmp_path / "run", resume=True, progress=False)
    assert epochs() == before and run.metrics()["plan"]["budget_ms"] == 2000
    with pytest.raises(UserError, match="differs .* at 'seed'"):  # what the teachers depend on may not change
        distill(load_recipe(path, ["seed=5"]), tmp_path / "run", resume=True, progress=False)


def test_one_class_is_refused_by_check_distill_and_shard(folder, tmp_path):
    """One class folder trains and scores 100% while learning nothing: every command that reads a folder
    says so in one line."""
    import shutil

    shutil.rmtree(folder / "dog")
    recipe = write_recipe(tmp_path / "r.yaml", data={"dataset": "imagefolder", "root": str(folder), "image_size": 12,
                                                     "val_per_class": 1})
    for args in (("data", "check", folder), ("distill", recipe, "--out", tmp_path / "run"),
                 ("data", "shard", folder, tmp_path / "shards")):
        res = run_cli(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "a classifier needs at least 2" in lines[0], res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()


def test_split_folders_under_the_root_are_wrong_not_classes(tmp_path):
    """root/train/<class>, root/val/<class>: the root one level too high would train 'train' against 'val'.
    data check says so (exit 1) and points at the folder to name; the training folder itself is fine."""
    root = tmp_path / "ds"
    for k, split in enumerate(("train", "val")):
        for c in ("cat", "dog"):
            for i in range(3):
                _img(root / split / c / f"{i}.png", 10 * k + i + (50 if c == "dog" else 0))
    res = run_cli("data", "check", root)
    assert res.returncode == 1 and "split_folders" in res.stdout and "point data.root at the training folder" in \
        res.stdout, res.stdout
    res = run_cli("data", "check", root / "train")
    assert res.returncode == 0 and "no problem found" in res.stdout, res.stdout


def test_a_file_or_link_the_scan_cannot_read_is_one_line_or_a_reported_file(folder, monkeypatch):
    """An entry the scan cannot stat (a link into a folder this user may not enter) stops in one line naming
    it; a file whose bytes cannot be read is reported unreadable, never a traceback from the duplicate
    search that reads every file's bytes."""
    from ekdc.data import check, folder as folder_mod

    locked = str(folder / "dog" / "d2.png")
    real_take = folder_mod._ClassWalk._take

    def take(self, e):
        if e.path == locked:
            raise PermissionError(13, "Permission denied")
        return real_take(self, e)

    monkeypatch.setattr(folder_mod._ClassWalk, "_take", take)
    with pytest.raises(UserError, match=r"cannot read .*d2.png \(Permission denied\)"):
        folder_mod.scan_folder(folder, "data.root")
    monkeypatch.setattr(folder_mod._ClassWalk, "_take", real_take)

    (folder / "dog" / "d2-copy.png").write_bytes(Path(locked).read_bytes())  # same size: its bytes get read
    real_check, real_digest = check.check_image, check._digest

    def refuse(path, *a, **k):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_digest(path, *a, **k)

    def header(path, *a, **k):
        if str(path) == locked:
            raise UserError(f"cannot read image {path}: Permission denied")
        return real_check(path, *a, **k)

    monkeypatch.setattr(check, "_digest", refuse)
    monkeypatch.setattr(check, "check_image", header)
    report = check.check_images(_data(folder))
    assert [u["path"] for u in report.unreadable] == [locked] and report.wrong
    assert report.identical == []  # the copy has no readable twin


def test_data_check_of_a_folder_takes_its_data_keys_and_refuses_the_others(folder, tmp_path):
    """--set on a bare folder sets its data: keys as a recipe would (the split counted by them); a key a folder
    has not is refused in one line, never ignored."""
    res = run_cli("data", "check", folder, "--set", "data.val_per_class=2", "--json", tmp_path / "c.json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert [(c["train"], c["val"]) for c in report["classes"]] == [(4, 2), (4, 2)]
    assert "data.val_per_class=2" in report["split"]
    for item, word in (("distill.epochs=3", "only its data: keys apply"), ("data.root=/elsewhere", "the folder is "
                                                                                   "data.root"),
                       ("data.val_per_class=0", "must be > 0")):
        res = run_cli("data", "check", folder, "--set", item)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and word in lines[0], (item, res.stderr)


def test_a_report_flag_never_turns_a_users_file_into_a_report(folder, tmp_path):
    """--json over a recipe, --plot over notes: refused in one line and the file kept; an earlier report of the
    same kind (or an empty file, as mktemp makes) is replaced."""
    from ekdc._io import check_outputs

    recipe = tmp_path / "cif.yaml"
    recipe.write_text("name: mine\n")
    res = run_cli("data", "check", folder, "--json", recipe)
    assert res.returncode == 2 and "exists and is not a JSON file" in res.stderr, res.stderr
    assert recipe.read_text() == "name: mine\n"
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(UserError, match="exists and is not a PNG image"):
        check_outputs({}, plot=notes)
    (tmp_path / "old.json").write_text('{"an": "earlier report"}')
    (tmp_path / "empty.json").write_text("")
    for name in ("old.json", "empty.json"):
        res = run_cli("data", "check", folder, "--json", tmp_path / name)
        assert res.returncode == 0 and json.loads((tmp_path / name).read_text())["classes"], res.stderr
