import numpy as np
import pytest
import torch

from ekdc.data import augment_batch, augment_params, epoch_order, load_data, stratified_split
from ekdc.recipe import Augment, DataConfig


def test_stratified_split_seeded_disjoint_balanced():
    labels = np.repeat(np.arange(5), 40)
    np.random.default_rng(3).shuffle(labels)
    a, rest = stratified_split(labels, per_class=8, seed=1)
    assert len(np.intersect1d(a, rest)) == 0 and len(a) + len(rest) == len(labels)
    assert np.bincount(labels[a]).tolist() == [8] * 5
    b, _ = stratified_split(labels, per_class=8, seed=1)
    c, _ = stratified_split(labels, per_class=8, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    f, _ = stratified_split(labels, fraction=0.25, seed=0)
    assert np.bincount(labels[f]).tolist() == [10] * 5


def test_limited_subset_disjoint_from_validation():
    cfg = DataConfig(dataset="synthetic", num_classes=4, num_samples=200, image_size=8, val_per_class=10, per_class=5)
    d = load_data(cfg)
    assert len(d.val_y) == 40 and len(d.train_y) == 20
    assert torch.bincount(d.train_y).tolist() == [5] * 4
    # synthetic images are unique: no validation image may appear in training
    train = {bytes(x.numpy()) for x in d.train_x}
    assert not any(bytes(x.numpy()) in train for x in d.val_x)


def test_digits_offline():
    d = load_data(DataConfig(dataset="digits", image_size=16, val_fraction=0.2, augment=False))
    assert d.train_x.shape[1:] == (3, 16, 16) and d.train_x.dtype == torch.uint8
    assert d.num_classes == 10 and len(d.train_y) + len(d.val_y) == 1797


def test_imagefolder_root_missing_or_empty(tmp_path):
    from ekdc import UserError

    with pytest.raises(UserError, match="folder not found"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "empty")))


def test_imagefolder_decodes(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.new("RGB", (10, 12), (i * 10, 0, 255 if c == "b" else 0)).save(tmp_path / c / f"{i}.png")
    d = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_per_class=2))
    assert d.classes == ["a", "b"] and d.train_x.shape == (8, 3, 8, 8) and len(d.val_y) == 4


def test_augment_batch_matches_reference_crop_and_flip():
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    p = augment_params(6, Augment(crop_padding=2, hflip=True), seed=0, epoch=3)
    out = augment_batch(x, p, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        dy, dx, flip = p[i].tolist()
        ref = padded[i, :, dy:dy + 8, dx:dx + 8]
        ref = ref.flip(-1) if flip else ref
        assert torch.equal(out[i], ref)
    assert torch.equal(p, augment_params(6, Augment(crop_padding=2), seed=0, epoch=3))


def test_cutout_blanks_one_clipped_square_and_leaves_crops_and_flips_as_they_were():
    from ekdc.data import CUTOUT_FILL, augment

    x = torch.randint(0, 120, (64, 3, 8, 8), dtype=torch.uint8)  # below the fill, so the hole is visible
    plain, holed = Augment(crop_padding=2), Augment(crop_padding=2, cutout=4)
    p, q = augment_params(64, plain, seed=1, epoch=2), augment_params(64, holed, seed=1, epoch=2)
    assert q.shape == (64, 5) and torch.equal(q[:, :3], p)  # the same crops and flips, two more columns
    out, base = augment(x, q, holed, 8), augment(x, p, plain, 8)
    sizes = set()
    for i in range(64):
        cy, cx = (int(v) * 8 // (1 << 16) for v in q[i, 3:])
        hole = torch.zeros(8, 8, dtype=torch.bool)
        hole[max(cy - 2, 0):cy + 2, max(cx - 2, 0):cx + 2] = True
        ref = torch.where(hole, torch.tensor(CUTOUT_FILL, dtype=torch.uint8), base[i])
        assert torch.equal(out[i], ref), i
        sizes.add(int(hole.sum()))
    assert 16 in sizes and min(sizes) < 16  # whole squares inside, clipped ones at the edges


def test_cutout_applies_to_resized_crops_too():
    from ekdc.data import augment

    aug = Augment(kind="resized_crop", cutout=3)
    x = torch.randint(0, 120, (5, 3, 20, 20), dtype=torch.uint8)
    p = augment_params(5, aug, seed=0, epoch=0, side=20)
    assert p.shape == (5, 7) and torch.equal(p[:, :5], augment_params(5, Augment(kind="resized_crop"), 0, 0, 20))
    out = augment(x, p, aug, 16)
    assert out.shape == (5, 3, 16, 16) and ((out == 128).all(1).flatten(1).sum(1) >= 4).all()


def test_epoch_order_shards_cover_everything():
    full = epoch_order(10, seed=0, epoch=1)
    assert sorted(full.tolist()) == list(range(10))
    shards = [epoch_order(10, seed=0, epoch=1, rank=r, world=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert set(torch.cat(shards).tolist()) == set(range(10))


def test_folder_split_does_not_depend_on_listing_order(tmp_path, monkeypatch):
    """Nested folders inside a class: the split must be the same whatever order os.walk lists them in
    (on a copy of the data the filesystem's order differs)."""
    import os

    from PIL import Image

    for c in ("a", "b"):
        for sub in ("x", "y", "z"):
            (tmp_path / c / sub).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, len(sub) * 30, 100 if c == "a" else 200)).save(tmp_path / c / sub / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_per_class=3)
    from ekdc.data import index_splits

    first = index_splits(cfg)
    real_walk = os.walk

    def reversed_walk(top, *a, **k):  # the same tree, subfolders listed in the opposite order
        for dirpath, dirnames, names in real_walk(top, *a, **k):
            dirnames.reverse()
            yield dirpath, dirnames, list(reversed(names))

    monkeypatch.setattr(os, "walk", reversed_walk)
    second = index_splits(cfg)
    pick = lambda ix: sorted(ix.val.source.files[i] for i in ix.val.positions)  # noqa: E731
    assert pick(first) == pick(second) and list(first.train.positions) == list(second.train.positions)


def test_a_split_decoded_again_comes_from_the_memo_until_a_file_changes(tmp_path, monkeypatch):
    import os

    from PIL import Image

    from ekdc.data import decode as dec

    monkeypatch.setattr(dec, "MEMO_MIN_FILES", 4)
    monkeypatch.setattr(dec, "_MEMO", dec.collections.OrderedDict())
    files = []
    for i in range(6):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(files[-1])
    calls = []
    real = dec.decode_image
    monkeypatch.setattr(dec, "decode_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = dec.decode_files(files, 8)
    first[0].fill_(255)  # a caller's change must not reach the next caller
    again = dec.decode_files(files, 8)
    assert len(calls) == 6 and int(again[0].max()) == 0 and torch.equal(again[1:], first[1:])
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(files[2])
    os.utime(files[2], ns=(1, 1))  # a file changed: decoded again, and the new pixels are what comes back
    assert int(dec.decode_files(files, 8)[2].max()) == 7 and len(calls) == 12
    kept = len(dec._MEMO)
    dec.decode_files(files[:3], 8)  # under MEMO_MIN_FILES: decoded, never kept
    assert len(dec._MEMO) == kept
