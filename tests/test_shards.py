"""WebDataset shards: `ekdc data shard` writes them, `ekdc distill` trains from them through the stream
loader, --resume after kill -9 retraces the same batches, and under a two-node torchrun each rank reads
only its own shards (counted)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ekdc import UserError, load_recipe
from ekdc.data import load_data

from conftest import ROOT, kill_9_during, run_cli, tiny_recipe

pytest.importorskip("webdataset", reason="shard tests need the shards extra (pip install 'ekdc[shards]')")


def _folder(root: Path, per_class: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for c, base in (("dark", 40), ("light", 200)):
        for i in range(per_class):
            (root / c).mkdir(parents=True, exist_ok=True)
            x = np.clip(base + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(x).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture()
def shards(tmp_path):
    out = {}
    for split, n in (("train", 24), ("val", 8)):
        _folder(tmp_path / "img" / split, n)
        res = run_cli("data", "shard", tmp_path / "img" / split, tmp_path / "shards" / split, "--shard-size", "8")
        assert res.returncode == 0, res.stderr
        out[split] = sorted(str(p) for p in (tmp_path / "shards" / split).glob("*.tar"))
    return tmp_path, out


def _recipe(tmp_path: Path, urls, val_urls, classes=None, **over) -> Path:
    raw = tiny_recipe(device="cpu", teachers=[{"arch": "resnet8", "train": {"epochs": 2, "batch_size": 8, "lr": 0.05}}],
                      distill={"epochs": 3, "batch_size": 8, "lr": 0.05}, **over)
    raw["data"] = {"dataset": "webdataset", "urls": urls, "val_urls": val_urls, "image_size": 16, "loader": "stream",
                   "workers": 1, "mean": [0.5] * 3, "std": [0.25] * 3, **({"classes": classes} if classes else {})}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_shard_writes_whole_shards_with_their_index(shards):
    tmp_path, files = shards
    folder = tmp_path / "shards" / "train"
    assert [Path(f).name for f in files["train"]] == [f"shard-{k:06d}.tar" for k in range(6)]
    index = json.loads((folder / "shards.json").read_text())
    assert sum(index["samples"].values()) == 48 and (folder / "classes.txt").read_text() == "dark\nlight\n"
    cfg = load_recipe(_recipe(tmp_path, str(folder / "shard-{000000..000005}.tar"), files["val"])).data  # braces or a list
    d = load_data(cfg)
    assert d.classes == ["dark", "light"] and len(d.train) == 48 and d.loader == "stream"
    assert sorted(d.val_y.tolist()) == [0] * 8 + [1] * 8  # labels as the .cls files say


def test_distill_from_shards_and_resume_after_kill_9(shards):
    tmp_path, files = shards
    recipe = _recipe(tmp_path, files["train"], files["val"])
    ref = run_cli("distill", recipe, "--out", tmp_path / "ref", "-q")
    assert ref.returncode == 0, ref.stderr
    m = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert m["train_images"] == 48 and m["teacher_ensemble_acc"] > 0.9  # dark and light: learnt
    run = tmp_path / "killed"
    kill_9_during(recipe, run, "student-ekd", 1)
    res = run_cli("distill", recipe, "--out", run, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "metrics.json").read_text())["student"] == m["student"]  # the same batches, retraced


def test_shards_refuse_a_listing_split(shards):
    tmp_path, files = shards
    raw = yaml.safe_load(_recipe(tmp_path, files["train"], files["val"]).read_text())
    raw["data"]["per_class"] = 4
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="read in order, so a stratified subset cannot be drawn"):
        load_data(load_recipe(tmp_path / "p.yaml").data)
    del raw["data"]["per_class"], raw["data"]["val_urls"]
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="data.val_urls"):
        load_data(load_recipe(tmp_path / "v.yaml").data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_read_their_own_shards(shards):
    """torchrun --nnodes 2 --nproc_per_node 1, two processes on this machine as two nodes (rendezvous on
    127.0.0.1). The training shards are pipe: commands that note the rank opening them."""
    tmp_path, files = shards
    opened = tmp_path / "opened.txt"
    urls = [f"pipe:echo $RANK {Path(f).name} >> {opened}; cat {f}" for f in files["train"]]
    recipe = _recipe(tmp_path, urls, files["val"], classes=["dark", "light"])  # a pipe: has no classes.txt beside it
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "ekdc", "distill",
                               str(recipe), "--out", str(tmp_path / "ddp"), "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for r in (0, 1)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2
    lines = [line.split() for line in opened.read_text().splitlines()]
    n_shards = len(files["train"])
    for rank in ("0", "1"):
        mine = [name for r, name in lines if r == rank]
        assert sorted(mine[:n_shards]) == sorted(Path(f).name for f in files["train"])  # the one counting pass
    # then, in every epoch of the 2 teacher and 3 student epochs, each rank reads 3 shards of its own
    per_rank = {rank: [name for r, name in lines if r == rank][n_shards:] for rank in ("0", "1")}
    assert len(per_rank["0"]) == len(per_rank["1"]) == 5 * 3
    for e in range(5):
        a, b = set(per_rank["0"][3 * e : 3 * e + 3]), set(per_rank["1"][3 * e : 3 * e + 3])
        assert not a & b and len(a | b) == n_shards
