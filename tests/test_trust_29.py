"""Shards, grids and runs you can trust (issue 29): the shard writer packs only what training can use and
never mixes two writes; the shard reader checks classes and counts; compare --report-only refuses a grid of
another recipe; a row or setting that changes nothing is refused, in distill and compare alike; rows are
told apart by what they train; --resume refuses data that changed; a run that fails on its data leaves no
folder; help texts keep their square brackets."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from ekdc import UserError, load_recipe
from ekdc.data import load_data

from conftest import ROOT, run_cli, tiny_recipe, write_recipe
from test_data_trust import _bomb, _img

TINY_AVG = dict(teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
                          {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}],
                distill={"epochs": 1, "batch_size": 32, "lr": 0.05, "temperature": 4.0}, mode="avg_kd")


def _one_line_exit_2(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("ekdc: error: "), res.stderr
    return lines[0]


def _folder(root: Path, per_class: int = 6, size: int = 12) -> Path:
    for i in range(per_class):
        _img(root / "cat" / f"c{i}.png", i, size)
        _img(root / "dog" / f"d{i}.png", 100 + i, size)
    return root


# --------------------------------------------------------------------------------------------------
# the shard writer (case 1, 2, and an OUT inside FOLDER)

wds = pytest.importorskip("webdataset", reason="shard tests need the shards extra (pip install 'ekdc[shards]')")


def _tar_members(folder: Path) -> list[str]:
    import tarfile

    names = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            names += tf.getnames()
    return names


def test_shard_packs_only_what_the_folder_check_accepts(tmp_path):
    root = _folder(tmp_path / "img")
    (root / "cat" / "empty.jpg").write_bytes(b"")  # a 0-byte .jpg
    (root / "cat" / "notes.jpg").write_text("a text file named .jpg")
    _bomb(root / "dog" / "huge.png")  # over the pixel limit
    os.link(root / "dog" / "d0.png", root / "cat" / "d0-linked.png")  # one image, two labels
    res = run_cli("data", "shard", root, tmp_path / "out", "--shard-size", "4")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "left out 3 unreadable" in out and "left out 2 in_two_classes" in out
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert sum(index["samples"].values()) == 11  # 12 good images, less d0 (in two classes)
    left = {Path(e["path"]).name for e in index["left_out"]}
    assert left == {"empty.jpg", "notes.jpg", "huge.png", "d0.png", "d0-linked.png"}
    why = {Path(e["path"]).name: e["why"] for e in index["left_out"]}
    assert why["notes.jpg"] == "unreadable: not in a format Pillow can identify"  # no <_io.BytesIO at 0x...>
    assert "0x" not in out and str(root / "cat") in out
    assert len([n for n in _tar_members(tmp_path / "out") if n.endswith(".cls")]) == 11
    # and what was packed trains: every sample decodes and is labelled by its folder
    val = _folder(tmp_path / "val_img", per_class=2)  # validation shards of their own (training ones are refused)
    assert run_cli("data", "shard", val, tmp_path / "val").returncode == 0
    d = load_data(load_recipe(_shard_recipe(tmp_path, tmp_path / "out", tmp_path / "val")).data)
    assert len(d.train) == 11 and sorted(d.train.labels.tolist()) == [0] * 6 + [1] * 5


def test_shard_never_mixes_two_writes(tmp_path):
    a, b = _folder(tmp_path / "a", per_class=8), _folder(tmp_path / "b", per_class=2)
    out = tmp_path / "out"
    assert run_cli("data", "shard", a, out, "--shard-size", "4").returncode == 0
    first = sorted(p.name for p in out.iterdir())
    assert len([n for n in first if n.endswith(".tar")]) == 4
    line = _one_line_exit_2(run_cli("data", "shard", b, out, "--shard-size", "4"))
    assert "already holds 4 shards" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == first  # refused: nothing changed
    res = run_cli("data", "shard", b, out, "--shard-size", "4", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]  # the old 1-3 are gone
    assert sum(json.loads((out / "shards.json").read_text())["samples"].values()) == 4
    (out / "mine.txt").write_text("the user's own file")
    line = _one_line_exit_2(run_cli("data", "shard", a, out, "--overwrite"))
    assert "not shards 'ekdc data shard' wrote (mine.txt)" in line and (out / "mine.txt").exists()


def test_shard_refuses_a_negative_seed_before_touching_out(tmp_path):
    line = _one_line_exit_2(run_cli("data", "shard", _folder(tmp_path / "img"), tmp_path / "out", "--seed", "-1"))
    assert "--seed -1: must be 0 or more" in line and not (tmp_path / "out").exists()
    line = _one_line_exit_2(run_cli("data", "shard", ROOT / "recipes" / "quickstart.yaml", tmp_path / "out"))
    assert "quickstart.yaml is a file, not a folder of class folders" in line


def test_shard_refuses_an_out_inside_the_folder(tmp_path):
    root = _folder(tmp_path / "img")
    for out in (root / "shards", root, root / "cat" / "s"):
        line = _one_line_exit_2(run_cli("data", "shard", root, out))
        assert "is inside FOLDER" in line
    assert not (root / "shards").exists() and not (root / "cat" / "s").exists()


def test_an_unfinished_write_is_refused_by_the_reader_and_replaced_by_the_writer(tmp_path):
    root = _folder(tmp_path / "img")
    out = tmp_path / "out"
    assert run_cli("data", "shard", root, out, "--shard-size", "4").returncode == 0
    (out / ".ekdc-shard-writing").write_text("killed")  # as a write killed part-way leaves it
    with pytest.raises(UserError, match="unfinished 'ekdc data shard' write"):
        load_data(load_recipe(_shard_recipe(tmp_path, out, out)).data)
    assert run_cli("data", "shard", root, out, "--shard-size", "6").returncode == 0  # no --overwrite needed
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]


def test_an_interrupted_overwrite_leaves_the_earlier_shards_as_they_were(tmp_path, monkeypatch):
    """--overwrite writes the new set whole before it touches the earlier one: Ctrl-C (or a full disk) in the
    middle leaves the earlier set byte for byte, and no staging folder; one a SIGKILL leaves is cleared by
    the next write."""
    from ekdc.data import shard_writer

    root = _folder(tmp_path / "img")
    out = tmp_path / "out"
    assert run_cli("data", "shard", root, out, "--shard-size", "4").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = shard_writer._write_tars

    def interrupted(*args, **kw):
        real(*args, **kw)  # every new shard written (into the staging folder), then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_writer, "_write_tars", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_shards(root, out, shard_size=6, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(shard_writer, "_write_tars", real)
    (out / (shard_writer.STAGING_PREFIX + "killed")).mkdir()  # what a SIGKILL mid-write leaves
    (out / (shard_writer.STAGING_PREFIX + "killed") / "shard-000000.tar").write_bytes(b"half")
    shard_writer.write_shards(root, out, shard_size=6, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "shard-000000.tar", "shard-000001.tar",
                                                     "shards.json"]
    # a first write killed before its swap leaves only its staging folder: the next write needs no --overwrite
    fresh = tmp_path / "fresh"
    (fresh / (shard_writer.STAGING_PREFIX + "killed")).mkdir(parents=True)
    shard_writer.write_shards(root, fresh, shard_size=6)
    assert sorted(p.name for p in fresh.iterdir())[-1] == "shards.json"
    assert not any(p.name.startswith(shard_writer.STAGING_PREFIX) for p in fresh.iterdir())


# --------------------------------------------------------------------------------------------------
# the shard reader (case 3 and 4)


def _shard_recipe(tmp_path: Path, train: Path, val: Path, name: str = "s.yaml", **data) -> Path:
    raw = tiny_recipe(device="cpu", mode="ce",
                      teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 4, "lr": 0.05}}],
                      distill={"epochs": 1, "batch_size": 4, "lr": 0.05})
    raw["data"] = {"dataset": "webdataset", "urls": sorted(str(p) for p in train.glob("*.tar")),
                   "val_urls": sorted(str(p) for p in val.glob("*.tar")), "image_size": 12, "loader": "stream",
                   "workers": 0, "mean": [0.5] * 3, "std": [0.25] * 3, **data}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture()
def shard_sets(tmp_path):
    for split, n in (("train", 6), ("val", 2)):
        root = _folder(tmp_path / "img" / split, per_class=n)
        assert run_cli("data", "shard", root, tmp_path / split, "--shard-size", "4").returncode == 0
    return tmp_path


def test_data_classes_must_agree_with_classes_txt(shard_sets):
    t = shard_sets
    with pytest.raises(UserError, match="another order than .*classes.txt .*label 0 is 'cat' there, 'dog' here"):
        load_data(load_recipe(_shard_recipe(t, t / "train", t / "val", classes=["dog", "cat"])).data)
    with pytest.raises(UserError, match="are not the classes of"):
        load_data(load_recipe(_shard_recipe(t, t / "train", t / "val", classes=["cat", "cow"])).data)
    assert load_data(load_recipe(_shard_recipe(t, t / "train", t / "val", classes=["cat", "dog"])).data).classes == \
        ["cat", "dog"]
    (t / "val" / "classes.txt").write_text("dog\ncat\n")  # validation shards of another class order
    with pytest.raises(UserError, match="the training shards' classes lists the classes in another order"):
        load_data(load_recipe(_shard_recipe(t, t / "train", t / "val")).data)


def test_a_shard_of_another_write_is_refused(shard_sets):
    t = shard_sets
    (t / "train" / "shard-000001.tar").rename(t / "train" / "shard-000009.tar")  # not what shards.json lists
    with pytest.raises(UserError, match="shard-000009.tar is not listed in .*shards.json.* two writes are mixed"):
        load_data(load_recipe(_shard_recipe(t, t / "train", t / "val")).data)
    # a pattern that names a shard the set does not have (an earlier, larger write's): not "mixed", missing
    (t / "train" / "shard-000009.tar").rename(t / "train" / "shard-000001.tar")
    recipe = _shard_recipe(t, t / "train", t / "val", urls=str(t / "train" / "shard-{000000..000005}.tar"))
    with pytest.raises(UserError, match=r"shard-000003.tar does not exist; .*shards.json lists 3 shards "
                                        r"\(shard-000000.tar .. shard-000002.tar\): fix data.urls to name those"):
        load_data(load_recipe(recipe).data)


def test_a_short_shard_stops_in_one_line_or_is_skipped_and_counted(shard_sets):
    t = shard_sets
    shard = t / "train" / "shard-000001.tar"
    os.truncate(shard, 3000)  # its first sample whole, the second cut
    recipe = _shard_recipe(t, t / "train", t / "val")
    d = load_data(load_recipe(recipe).data)
    with pytest.raises(UserError, match="shard-000001.tar is .* bytes, shards.json says .*skip_bad_files"):
        list(d.train.epoch(None, 0, 0, 4))
    line = _one_line_exit_2(run_cli("distill", recipe, "--out", t / "run", "-q"))
    assert "shard-000001.tar" in line and "cut short" in line
    # skip_bad_files: what the shard holds trains; the short shard and its lost samples are in metrics.json
    recipe = _shard_recipe(t, t / "train", t / "val", name="skip.yaml", skip_bad_files=True)
    res = run_cli("distill", recipe, "--out", t / "skip", "-q")
    assert res.returncode == 0, res.stderr
    m = json.loads((t / "skip" / "metrics.json").read_text())
    assert m["short_shards"] == [str(shard)] and "skipped_samples" in m and m["train_images"] == 12
    # the shard held 4; the tar reader stops at the cut before it hands over even the whole first sample
    assert m["lost_samples"] == 4 and m["train_images"] - m["lost_samples"] == 8
    assert "shards shorter than their shards.json says, 4 samples missing from them" in res.stdout + res.stderr


def test_a_bad_sample_in_a_shard_is_skipped_and_counted(shard_sets):
    import io
    import tarfile

    t = shard_sets
    shard = t / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:  # its first image replaced by bytes that are no image (same size)
        for k, (m, data) in enumerate(members):
            data = b"x" * len(data) if k == 0 else data
            tf.addfile(m, io.BytesIO(data))
    index = json.loads((t / "train" / "shards.json").read_text())
    index["bytes"][shard.name] = shard.stat().st_size
    (t / "train" / "shards.json").write_text(json.dumps(index))
    d = load_data(load_recipe(_shard_recipe(t, t / "train", t / "val")).data)
    with pytest.raises(UserError, match="cannot read image"):
        list(d.train.epoch(None, 0, 0, 4))
    d = load_data(load_recipe(_shard_recipe(t, t / "train", t / "val", skip_bad_files=True)).data)
    d.train.workers = 1  # skipped in a worker process, counted in the main one
    assert sum(len(c.labels) for c in d.train.epoch(None, 0, 0, 4)) == 12  # 11 samples, read again to fill 3 batches
    assert d.read_problems() == {"skipped_samples": 1, "short_shards": [], "lost_samples": 0}


# --------------------------------------------------------------------------------------------------
# compare --report-only (case 5)


def _fake_cell(out: Path, recipe) -> None:
    """The recipe row's seed-0 cell of a grid trained from ``recipe``, as compare writes its recipe.yaml."""
    from ekdc.comparison import parse_row
    from ekdc.comparison.rows import row_recipe
    from ekdc.recipe import dump_recipe, recipe_from_dict

    raw = recipe.model_dump(mode="json")
    for i, t in enumerate(recipe.teachers):
        raw["teachers"][i] = {**raw["teachers"][i], "weights": str(out / "teachers" / "teachers" / f"{t.name}.pt"),
                              "train": None, "checkpoint": None, "pretrained": False}
    r = row_recipe(raw, parse_row("recipe"), None)
    r["seed"], r["name"] = 0, f"{recipe.name}-recipe-s0"
    (out / "recipe" / "s0").mkdir(parents=True)
    (out / "recipe" / "s0" / "recipe.yaml").write_text(dump_recipe(recipe_from_dict(r)))


def test_report_only_refuses_a_grid_of_another_recipe(tmp_path):
    from ekdc.comparison import compare

    path = write_recipe(tmp_path / "r.yaml", **TINY_AVG)
    out = tmp_path / "g"
    _fake_cell(out, load_recipe(path))
    report = compare(load_recipe(path), "recipe", [0], out, report_only=True)  # the same recipe: reported
    assert report["rows"][0]["missing_seeds"] == [0]
    assert not (out / "compare.json").exists()  # nothing finished: no report file
    line = _one_line_exit_2(run_cli("compare", path, "--rows", "recipe", "--seeds", "0", "--out", out,
                                    "--report-only", "--set", "distill.lr=0.1"))
    assert "was trained from another recipe ('distill.lr' differs)" in line
    assert not (out / "compare.json").exists()  # nothing overwritten


# --------------------------------------------------------------------------------------------------
# a row or setting that changes nothing (case 6, 8), rows told apart by what they train (case 7)


@pytest.mark.parametrize("sets, words", [
    (["mode=avg_kd", "distill.weights.feat=1.0"], "distill.weights.feat: 1 does nothing in mode avg_kd"),
    (["mode=ce", "distill.kd.loss=dkd"], "distill.kd.loss: dkd does nothing: mode ce has no kd term"),
    (["distill.kd.loss=dkd", "distill.kd.alpha=0", "distill.kd.beta=0"], "alpha and beta are both 0"),
    (["mode=ce", "distill.teacher_cache.views=2"], "distill.teacher_cache.views: 2 does nothing"),
    (["distill.weights.kd=0", "distill.kd.warmup_epochs=2"], "distill.kd.warmup_epochs: 2 does nothing"),
])
def test_a_setting_that_changes_nothing_is_refused_in_distill_and_compare(tmp_path, sets, words):
    path = write_recipe(tmp_path / "r.yaml")
    flags = [x for s in sets for x in ("--set", s)]
    for cmd in (["distill", path, "--runs", tmp_path / "runs"], ["compare", path, "--out", tmp_path / "g"]):
        line = _one_line_exit_2(run_cli(*cmd, *flags, "-q"))
        assert words in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "g").exists()


@pytest.mark.parametrize("mode, rows, words", [
    ("avg_kd", "recipe,recipe+feat", "row recipe+feat: distill.weights.feat: 1 does nothing in mode avg_kd"),
    ("ekd", "recipe+dkd,recipe+dkd+dkd", "'recipe+dkd+dkd': +dkd is given twice"),
    ("ekd", "ekd,recipe", "'recipe' trains the same configuration as 'ekd'"),
    ("ekd", "recipe,recipe+k0", "'recipe+k0': +k0 changes nothing"),
    ("avg_kd", "recipe,avg_kd", "'avg_kd' trains the same configuration as 'recipe'"),
])
def test_rows_that_train_the_same_are_refused_before_training(tmp_path, mode, rows, words):
    path = write_recipe(tmp_path / "r.yaml", **{**TINY_AVG, "mode": mode})
    line = _one_line_exit_2(run_cli("compare", path, "--rows", rows, "--seeds", "0", "--out", tmp_path / "g", "-q"))
    assert words in line
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("seeds, words", [
    ("0,0", "--seeds: 0 is listed twice"),
    ("0,-1", "--seeds: -1 is out of range"),
    ("0,1.5", "--seeds: '1.5' is not an integer"),
    (",", "--seeds: give at least one seed"),
])
def test_bad_seeds_are_refused_before_training(tmp_path, seeds, words):
    """A repeated seed asks for the same cell twice, as a repeated row does: both are refused, not merged."""
    path = write_recipe(tmp_path / "r.yaml", **TINY_AVG)
    line = _one_line_exit_2(run_cli("compare", path, "--rows", "recipe", "--seeds", seeds, "--out", tmp_path / "g", "-q"))
    assert words in line
    assert not (tmp_path / "g").exists()


def test_rows_of_a_dkd_recipe_keep_to_what_their_mode_uses(tmp_path):
    """A ce row of a recipe with DKD settings and a cache drops them (they would change nothing), and a
    KL row drops DKD's alpha and beta, instead of being refused."""
    from ekdc.comparison import parse_rows
    from ekdc.comparison.grid import _cells

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **TINY_AVG), [
        "distill.kd.loss=dkd", "distill.kd.alpha=2", "distill.teacher_cache.views=2", "distill.temperature=2"])
    one = {**recipe.student.model_kwargs(), "num_branches": 1}
    cells = {row.name: r for row, _, _, r in _cells(recipe.model_dump(mode="json"), parse_rows("recipe,ce,avg_kd"),
                                                    [0], {"plain": one}, tmp_path / "g")}
    ce = cells["ce"]
    assert ce.distill.term_settings()["kd"].loss == "kl" and ce.distill.teacher_cache.views == 0
    assert ce.distill.temperature == 4.0
    kd = cells["avg_kd"].distill.term_settings()["kd"]
    assert (kd.loss, kd.alpha, kd.beta) == ("kl", 1.0, 8.0) and cells["avg_kd"].distill.teacher_cache.views == 2


# --------------------------------------------------------------------------------------------------
# --resume on the data the run started with (case 9); no folder left by a run that fails on its data (case 10)


def _folder_recipe(tmp_path: Path, root: Path) -> Path:
    return write_recipe(tmp_path / "f.yaml", mode="ce", device="cpu",
                        data={"dataset": "imagefolder", "root": str(root), "image_size": 12, "val_per_class": 2},
                        teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 4, "lr": 0.05}}],
                        distill={"epochs": 1, "batch_size": 4, "lr": 0.05})


def test_resume_refuses_data_that_changed_naming_it(tmp_path):
    root = _folder(tmp_path / "img", per_class=5)
    recipe = _folder_recipe(tmp_path, root)
    run = tmp_path / "run"
    res = run_cli("distill", recipe, "--out", run, "--teachers-only", "-q")
    assert res.returncode == 0, res.stderr
    assert (run / "data.json").is_file()
    a, b = root / "cat" / "c0.png", root / "cat" / "c3.png"  # two images swapped under their names
    a.rename(tmp_path / "tmp.png"), b.rename(a), (tmp_path / "tmp.png").rename(b)
    line = _one_line_exit_2(run_cli("distill", recipe, "--out", run, "--resume", "-q"))
    assert "--resume: the data is not what" in line and "changed (first: " in line
    assert "c0.png" in line or "c3.png" in line
    a.rename(tmp_path / "tmp.png"), b.rename(a), (tmp_path / "tmp.png").rename(b)  # put back: resumes
    res = run_cli("distill", recipe, "--out", run, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    assert (run / "student.pt").is_file()
    _img(root / "dog" / "d9.png", 109)  # an image added
    line = _one_line_exit_2(run_cli("distill", recipe, "--out", run, "--resume", "-q"))
    assert "--resume: the data is not what" in line


def test_resume_goes_by_content_not_by_modification_time(tmp_path):
    """A copied data set (new mtimes, same bytes) resumes; two same-sized images swapped under their names
    (rename keeps mtimes, so only their content tells) do not."""
    from PIL import Image

    root = _folder(tmp_path / "img", per_class=5)
    Image.new("RGB", (12, 12), (250, 10, 10)).save(root / "cat" / "x.bmp")
    Image.new("RGB", (12, 12), (10, 10, 250)).save(root / "dog" / "y.bmp")
    recipe = _folder_recipe(tmp_path, root)
    run = tmp_path / "run"
    assert run_cli("distill", recipe, "--out", run, "--teachers-only", "-q").returncode == 0
    for f in root.rglob("*.*"):
        os.utime(f, (1_000_000_000, 1_000_000_000))  # what a copy without -p does
    res = run_cli("distill", recipe, "--out", run, "--teachers-only", "--resume", "-q")
    assert res.returncode == 0, res.stderr
    mtimes = {e[0]: e[3] for e in json.loads((run / "data.json").read_text())["splits"]["train"]["files"]}
    assert set(mtimes.values()) == {1_000_000_000 * 10**9}  # the record follows the copy
    a, b = root / "cat" / "x.bmp", root / "dog" / "y.bmp"
    assert a.stat().st_size == b.stat().st_size
    a.rename(tmp_path / "tmp.bmp"), b.rename(a), (tmp_path / "tmp.bmp").rename(b)
    line = _one_line_exit_2(run_cli("distill", recipe, "--out", run, "--teachers-only", "--resume", "-q"))
    assert "--resume: the data is not what" in line and ("x.bmp" in line or "y.bmp" in line)


def test_a_run_that_fails_on_its_data_leaves_no_folder(tmp_path):
    root = _folder(tmp_path / "img", per_class=3)
    (root / "cat" / "empty.png").write_bytes(b"")
    recipe = _folder_recipe(tmp_path, root)
    line = _one_line_exit_2(run_cli("distill", recipe, "--runs", tmp_path / "runs", "-q"))
    assert "cannot read image" in line and "empty.png" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    _one_line_exit_2(run_cli("distill", recipe, "--out", tmp_path / "new", "-q"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "made").mkdir()  # a folder the user made stays, empty
    _one_line_exit_2(run_cli("distill", recipe, "--out", tmp_path / "made", "-q"))
    assert (tmp_path / "made").is_dir() and not any((tmp_path / "made").iterdir())
    (root / "cat" / "empty.png").unlink()  # good data, but a teacher file that is not there: nothing trained either
    line = _one_line_exit_2(run_cli("distill", recipe, "--out", tmp_path / "t", "-q", "--set",
                                    f"teachers.0.weights={tmp_path / 'gone.pt'}", "--set", "teachers.0.train=null"))
    assert "gone.pt" in line and not (tmp_path / "t").exists()


# --------------------------------------------------------------------------------------------------
# help texts (case 11); export's parity streamed for streamed data


@pytest.mark.parametrize("cmd, words", [
    (["compare"], ["Folder of the grid [default: runs/compare/<name>]", "[default: OUT/compare.png]"]),
    (["distill"], ["[default: runs/<recipe name>, numbered if taken]"]),
    (["bench"], ["[default: teachers.onnx beside the first model]"]),
    (["export"], ["pip install 'ekdc[qad]'", "[default: the run's distill.lr / 50]"]),
    (["data", "shard"], ["--overwrite", "[default: 1000]"]),
])
def test_help_texts_keep_square_brackets(cmd, words):
    res = run_cli(*cmd, "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for w in words:
        assert w in text, text


def test_export_streams_the_validation_images_of_streamed_data(tmp_path, shard_sets):
    from ekdc.data.splits import SplitImages, index_splits
    from ekdc.deploy.export import _images

    root = _folder(tmp_path / "img2", per_class=5)
    for path, loader in ((_folder_recipe(tmp_path, root), "stream"), (_shard_recipe(shard_sets, shard_sets / "train",
                                                                                    shard_sets / "val"), "stream")):
        r = load_recipe(path, [f"data.loader={loader}"])
        index = index_splits(r.data)
        val_x, val_y, _ = _images(r, list(index.classes), 0, 4)
        assert isinstance(val_x, SplitImages)
        ref_x, ref_y = index.take("val")
        got = torch.cat([val_x[i : i + 3] for i in range(0, len(val_x), 3)])
        assert torch.equal(got, ref_x) and val_y.tolist() == ref_y.tolist()
        assert torch.equal(val_x[0:2], ref_x[:2])  # from the start again
    eager, _, _ = _images(load_recipe(_folder_recipe(tmp_path, root), ["data.loader=memory"]), ["cat", "dog"], 0, 4)
    assert isinstance(eager, torch.Tensor)


def test_a_grid_refuses_a_teacher_file_replaced_under_its_name(tmp_path):
    """New teacher weights shipped under the same file name: the recipe's text is unchanged, but the finished
    cells were distilled from the old file. compare (and --report-only) refuses instead of mixing them."""
    from ekdc.comparison import compare
    from ekdc.models import create_model

    weights = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model("resnet8", num_classes=4).state_dict(), weights)
    teachers = [{"arch": "resnet8", "weights": str(weights)}, {"arch": "resnet8", "weights": str(weights), "name": "b"}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **{**TINY_AVG, "teachers": teachers}))
    out = tmp_path / "g"
    compare(recipe, "recipe", [0], out, progress=False)
    held = json.loads((out / "teacher_files.json").read_text())
    assert set(held) == {"resnet8", "b"} and held["b"]["path"] == str(weights)
    compare(recipe, "recipe", [0], out, progress=False, report_only=True)  # the same files: reported
    torch.manual_seed(1)
    torch.save(create_model("resnet8", num_classes=4).state_dict(), weights)  # new weights, same name
    for report_only in (False, True):
        with pytest.raises(UserError, match=r"teacher.pt \(teacher resnet8\) is not the file this grid's cells were "
                                             r"distilled from"):
            compare(recipe, "recipe", [0], out, progress=False, report_only=report_only)
    before = (out / "compare.json").read_text()
    res = run_cli("compare", tmp_path / "r.yaml", "--rows", "recipe", "--seeds", "0", "--out", out, "--report-only")
    assert "teacher_files.json holds its earlier sha256" in _one_line_exit_2(res)
    assert (out / "compare.json").read_text() == before  # the report of the old cells is left as it was


def test_export_and_bench_refuse_a_validation_split_that_holds_training_images(tmp_path):
    """Images added to the folder after training re-draw the seeded split: export and bench must not score
    the student on images it trained on (the run's data.json says which); a split that only differs is a
    note, and the data put back exports again."""
    from ekdc.data import index_splits
    from ekdc.data.fingerprint import check_held_out

    root = _folder(tmp_path / "img", per_class=6)
    recipe = _folder_recipe(tmp_path, root)
    run = tmp_path / "run"
    assert run_cli("distill", recipe, "--out", run, "-q").returncode == 0
    assert check_held_out(run, index_splits(load_recipe(run / "recipe.yaml").data)) is None  # unchanged: silent
    added = [root / "cat" / f"a{i}.png" for i in range(9)]
    for i, f in enumerate(added):
        _img(f, 200 + i)
    line = _one_line_exit_2(run_cli("export", run, "--out", tmp_path / "e", "--fold", "grouped"))
    assert "is not the one" in line and "images that run trained on" in line and str(run) in line
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").glob("*.onnx"))
    for f in added:
        f.unlink()
    assert run_cli("export", run, "--out", tmp_path / "e", "--fold", "grouped").returncode == 0
    for i, f in enumerate(added):
        _img(f, 200 + i)
    line = _one_line_exit_2(run_cli("bench", tmp_path / "e" / "student.onnx", "--data", run, "--repeats", "1",
                                    "--runs", "2", "--batch", "1"))
    assert "is not the one" in line
    # a split that differs but holds no training image (here: one the record did not list) is a note
    for f in added:
        f.unlink()
    saved = json.loads((run / "data.json").read_text())
    dropped = saved["splits"]["val"]["files"].pop()
    (run / "data.json").write_text(json.dumps(saved))
    note = check_held_out(run, index_splits(load_recipe(run / "recipe.yaml").data))
    assert note and "differs" in note and "1 now in it" in note and Path(dropped[0]).name in note


def test_a_class_with_no_training_image_is_wrong_in_data_check_and_refused_by_distill(tmp_path):
    """A class of one image (or of no more than val_per_class) goes to validation whole: the student would
    ship it untrained. data check calls it WRONG (exit 1); distill refuses it in one line naming it."""
    root = _folder(tmp_path / "img", per_class=6)
    _img(root / "deer" / "only.png", 300)
    res = run_cli("data", "check", root)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "WRONG: no_training_image" in res.stdout and "deer" in res.stdout
    def recipe(**data):
        return write_recipe(tmp_path / "r.yaml", mode="ce", device="cpu",
                            data={"dataset": "imagefolder", "root": str(root), "image_size": 12, **data},
                            teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 4}}],
                            distill={"epochs": 1, "batch_size": 4})

    line = _one_line_exit_2(run_cli("distill", recipe(), "--out", tmp_path / "r", "-q"))
    assert "class 'deer' has no training image" in line and "1 image(s)" in line and "val_fraction" in line
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    # fewer images than val_per_class asks for: named by its folder, and the key that asked
    _img(root / "deer" / "two.png", 301)
    line = _one_line_exit_2(run_cli("distill", recipe(val_per_class=3), "--out", tmp_path / "r2", "-q"))
    assert "data.val_per_class: class 'deer' has 2 images, fewer than the 3 asked for" in line


def test_a_changed_split_of_data_without_file_lists_is_not_vouched_for(tiny_run, tmp_path):
    """Tensors or shards have no file list to tell training images by: a changed validation split is a note
    saying ekdc cannot tell, never one saying it holds no training image."""
    import shutil

    from ekdc.data import index_splits
    from ekdc.data.fingerprint import check_held_out
    from ekdc.data.splits import untrained_class_words

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    index = index_splits(load_recipe(run / "recipe.yaml").data)
    assert check_held_out(run, index) is None
    saved = json.loads((run / "data.json").read_text())
    saved["splits"]["val"]["digest"] = "0" * 64
    (run / "data.json").write_text(json.dumps(saved))
    note = check_held_out(run, index)
    assert "cannot tell" in note and "none of them" not in note
    (run / "data.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not the record"):
        check_held_out(run, index)
    assert "has no image at all" in untrained_class_words("deer", 0, None)


def test_an_unchanged_split_is_told_without_reading_its_images(tmp_path, monkeypatch):
    """Export and bench check the split on every call: an unchanged folder (same paths, labels, sizes and
    modification times) must not cost a digest of every image."""
    from ekdc.data import fingerprint, index_splits

    root = _folder(tmp_path / "img", per_class=5)
    index = index_splits(load_recipe(_folder_recipe(tmp_path, root)).data)
    (tmp_path / "run").mkdir()
    fingerprint.record_or_check(tmp_path / "run", index, resume=False)

    def no_digest(path):
        raise AssertionError(f"digested {path}")

    monkeypatch.setattr(fingerprint, "_digest", no_digest)
    assert fingerprint.check_held_out(tmp_path / "run", index) is None
    for f in root.rglob("*.png"):  # changed times (a copy): the slow path, by content
        os.utime(f, (1_000_000_000, 1_000_000_000))
    with pytest.raises(AssertionError, match="digested"):
        fingerprint.check_held_out(tmp_path / "run", index_splits(load_recipe(_folder_recipe(tmp_path, root)).data))
