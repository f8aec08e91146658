"""Data sources behind one protocol: a source read in order (a tar of JPEGs, here registered from this
file alone) trains through the stream loader like any folder."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ekdc import UserError, distill
from ekdc.data import (OrderedSource, Sources, index_splits, list_datasets, load_data, register_dataset,
                       unregister_dataset)
from ekdc.recipe import recipe_from_dict

from conftest import tiny_recipe

CLASSES = ["circle", "square"]


class TarShards(OrderedSource):
    """JPEGs in tar files, ``<class>/<name>.jpg``, read member by member: no index, no listing."""

    def __init__(self, shards: list[str]):
        self.shards, self.classes = list(shards), list(CLASSES)
        self.reads = 0
        self._n = sum(1 for s in self.shards for _ in self._members(s))

    @staticmethod
    def _members(shard: str):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".jpg"):
                    yield m.name[: -len(".jpg")], tf.extractfile(m).read()

    def __len__(self) -> int:
        return self._n

    def read(self, shard: str):
        self.reads += 1
        for key, data in self._members(shard):
            yield key, io.BytesIO(data), CLASSES.index(key.split("/")[0])


def _image(kind: str, i: int) -> bytes:
    rng = np.random.default_rng(i)
    x = (rng.random((16, 16, 3)) * 60).astype(np.uint8)
    if kind == "circle":
        yy, xx = np.mgrid[:16, :16]
        x[(yy - 8) ** 2 + (xx - 8) ** 2 < 25] = 230
    else:
        x[4:12, 4:12] = 230
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_shards(folder: Path, shards: int, per_shard: int, offset: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, i = [], offset
    for s in range(shards):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for _ in range(per_shard):
                kind = CLASSES[i % 2]
                data = _image(kind, i)
                info = tarfile.TarInfo(f"{kind}/{i:05d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                i += 1
        paths.append(str(path))
    return paths


@pytest.fixture()
def toy_tar(tmp_path):
    train = _write_shards(tmp_path / "train", shards=4, per_shard=24)
    val = _write_shards(tmp_path / "val", shards=1, per_shard=32, offset=10_000)

    @register_dataset("toy_tar")
    def toy_tar_source(cfg) -> Sources:
        return Sources(TarShards(train), TarShards(val))

    yield tmp_path
    unregister_dataset("toy_tar")


def _recipe(dataset="toy_tar", **data):
    raw = tiny_recipe(mode="avg_kd", teachers=[{"arch": "resnet8", "train": {"epochs": 6, "batch_size": 8, "lr": 0.05}}])
    raw["data"] = {"dataset": dataset, "image_size": 16, "loader": "stream", "workers": 1, **data}
    raw["distill"].update({"epochs": 6, "batch_size": 8, "lr": 0.05})
    return recipe_from_dict(raw)


def test_an_ordered_source_trains_through_the_stream_loader(toy_tar):
    assert "toy_tar" in list_datasets()  # the registry lists it, as the recipe schema checks it
    recipe = _recipe()
    run = distill(recipe, toy_tar / "run", progress=False)
    m = json.loads((run.path / "metrics.json").read_text())
    assert m["loader"] == "stream" and m["train_images"] == 96 and m["val_images"] == 32
    epochs = [json.loads(line) for line in (run.path / "log.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert [e["stage"] for e in epochs] == ["teacher-resnet8"] * 6 + ["student-avg_kd"] * 6
    assert m["teacher_ensemble_acc"] > 0.9 and m["student"]["ensemble_acc"] > 0.9  # circles and squares: learnt


def test_ordered_batches_follow_the_seed_not_the_arrival_order(toy_tar):
    data = load_data(_recipe().data)
    aug = _recipe().data.augment_config

    def epoch(seed, workers):
        data.train.workers = workers
        return [(c.images.clone(), c.labels.clone(), c.aug_params.clone()) for c in data.train.epoch(aug, seed, 0, 16)]

    a, b = epoch(0, 0), epoch(0, 2)  # two worker processes interleave shards, yet each sample's view is its key's
    assert len(a) == len(b) == 96 // 16
    key = lambda batches: sorted((bytes(x.numpy()), int(y), tuple(p.tolist()))  # noqa: E731
                                 for xs, ys, ps in batches for x, y, p in zip(xs, ys, ps))
    assert key(a) == key(b)
    assert not torch.equal(torch.cat([x for x, _, _ in epoch(1, 0)]), torch.cat([x for x, _, _ in a]))  # another seed
    # evaluation reads the validation shard in its listed order, labels included
    xs, ys = zip(*data.val.in_order(10))
    assert torch.cat(ys).tolist() == data.val_y.tolist() and sum(len(x) for x in xs) == 32


def test_shards_moved_to_another_folder_give_the_same_epoch(tmp_path):
    """The shuffle is seeded by the shards' names, not their paths: a run is reproduced from the data."""
    def epoch(folder):
        train = _write_shards(folder, shards=4, per_shard=24)
        val = _write_shards(folder.with_name("val"), shards=1, per_shard=8)  # a validation set of its own
        register_dataset("toy_moved")(lambda cfg: Sources(TarShards(train), TarShards(val)))
        try:
            data = load_data(_recipe("toy_moved").data)
            data.train.workers = 0
            return [(c.images.clone(), c.labels.clone()) for c in data.train.epoch(None, 0, 0, 16)]
        finally:
            unregister_dataset("toy_moved")

    a, b = epoch(tmp_path / "here" / "train"), epoch(tmp_path / "elsewhere" / "deeper" / "train")
    assert len(a) == len(b) == 96 // 16
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_ordered_sources_refuse_what_needs_positions(toy_tar):
    with pytest.raises(UserError, match="read in order, so a stratified subset cannot be drawn"):
        index_splits(_recipe(per_class=4).data)
    with pytest.raises(UserError, match="distill.teacher_cache: the training images are read in order"):
        raw = _recipe().model_dump(mode="json")
        raw["distill"]["teacher_cache"]["views"] = 2
        distill(recipe_from_dict(raw), toy_tar / "cached", progress=False)
    assert not (toy_tar / "cached" / "teachers" / "resnet8.pt").exists()  # refused before any teacher trained


def test_an_ordered_source_in_memory_is_random_access(toy_tar):
    data = load_data(_recipe(loader="memory").data)
    assert data.loader == "memory" and data.train_x.shape == (96, 3, 16, 16) and data.train.random_access


@pytest.mark.parametrize("labels, words", [
    (np.arange(40) % 3, "the training labels run from 0 to 2, but a label is a class's index, 0 .. 1 for its 2 classes"),
    (np.arange(40) % 2 - 1, "the training labels run from -1 to 0"),
])
def test_a_data_sets_labels_outside_its_classes_are_refused(labels, words):
    """A plugin data set whose labels do not index its classes (3 labels for 2 names, or -1) is one line
    before anything trains, not an index error in a loss or a ValueError from a count."""
    from ekdc.data import TensorSource

    images = torch.zeros(40, 3, 8, 8, dtype=torch.uint8)
    register_dataset("toy_labels")(lambda cfg: Sources(TensorSource(images, labels, ["a", "b"])))
    try:
        with pytest.raises(UserError, match=words):
            index_splits(_recipe("toy_labels", image_size=8).data)
    finally:
        unregister_dataset("toy_labels")
