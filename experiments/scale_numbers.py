#!/usr/bin/env python3
"""ImageNet-1k at 224 px on many GPUs, on paper: what a node needs, from what this machine measures per core
and the H100 figures the project has. Writes docs/SCALE.md.

    python experiments/scale_numbers.py [--images 300] [--views 10]

Measured here, one core (``torch.set_num_threads(1)``, one process): decoding a photo-sized JPEG to the
224 px student's canonical view (shorter side 256, centre 256x256: ekdc's ``decode_image``), its
RandomResizedCrop view (``resized_crop_batch``), and reading a tar shard of such JPEGs from local disk.
The JPEGs are CIFAR-10 images upsampled to 500x375 and saved at quality 90 (about ImageNet's mean size;
smoother than photos, so decoding real photos costs somewhat more). The H100 figures are the project's
own, from the teacher-cache study (docs/TEACHER-CACHE.md, docs/teacher-cache.json): ten runs shared one
GPU there, so they are lower bounds on what one run gets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "train"

from ekdc.data import decode_image, resized_crop_batch  # noqa: E402
from ekdc.data.augment import augment_params  # noqa: E402
from ekdc.data.config import Augment  # noqa: E402

# ImageNet-1k's training split: images, classes and size on disk (its published figures)
IMAGENET = {"images": 1_281_167, "classes": 1000, "bytes": 147_897_477_120}
TEACHER_MACS = 3 * 4.1e9  # three teachers of about 4 GMACs (ResNet-50's 4.09 GMACs at 224 px: docs/STUDENT-224.md)
STUDENT_MACS = 246.4e6  # recipes/imagefolder-224.yaml's 3-branch student (docs/STUDENT-224.md)


def _photos(folder: Path, n: int) -> list[Path]:
    files = sorted(p for c in sorted(DATA.iterdir()) for p in sorted(c.iterdir())[: n // 10 + 1])[:n]
    out = []
    for i, f in enumerate(files):
        with Image.open(f) as im:
            big = im.convert("RGB").resize((500, 375), Image.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        big.save(path, quality=90)
        out.append(path)
    return out


def _ms(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return 1e3 * (time.perf_counter() - t0) / len(items)


def measure(n: int) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        photos = _photos(Path(tmp), n)
        size = statistics.mean(p.stat().st_size for p in photos)
        decode = [_ms(lambda p: decode_image(str(p), 224, "resized_crop"), photos) for _ in range(3)]
        x = torch.stack([decode_image(str(p), 224, "resized_crop") for p in photos[:64]])
        aug = Augment(kind="resized_crop")
        params = augment_params(len(x), aug, 0, 0, x.shape[-1])
        crop = [1e3 * _t(lambda: resized_crop_batch(x, params, 224)) / len(x) for _ in range(5)]
        shard = Path(tmp) / "shard.tar"
        with tarfile.open(shard, "w") as tf:
            for p in photos:
                tf.add(p, arcname=p.name)
        t0 = time.perf_counter()
        with tarfile.open(shard) as tf:
            read = sum(len(tf.extractfile(m).read()) for m in tf if m.isfile())
        tar_mb_s = read / 1e6 / (time.perf_counter() - t0)
    return {"photos": n, "jpeg_bytes": size, "decode_ms": statistics.median(decode), "decode_rounds_ms": decode,
            "crop_ms": statistics.median(crop), "tar_read_mb_s": tar_mb_s}


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def h100_figures() -> dict:
    """From docs/teacher-cache.json: the 10-view cache build (5,000 images x 10 views through 3 teachers of
    782.3M MACs together) and the cached student stages (30 epochs of 5,000 images, 41.3M MACs a student)."""
    d = json.loads((ROOT / "docs" / "teacher-cache.json").read_text())
    cells = [c for r in d["rows"] for c in r["cells"] if c.get("teacher_cache") and c["teacher_cache"]["views"] == 10]
    build = min(c["teacher_cache"]["build_seconds"] for c in cells)
    student_s = statistics.median(c["seconds"] for c in cells)
    teacher_macs_s = 5000 * 10 * 782.3e6 / build
    student_macs_s = 30 * 5000 * 41.3e6 * 3 / student_s  # forward and backward: about 3x the forward's MACs
    return {"build_s": build, "teacher_macs_s": teacher_macs_s, "student_s": student_s, "student_macs_s": student_macs_s}


def page(m: dict, h: dict, views: int) -> str:
    n, k = IMAGENET["images"], views
    live_ips = h["teacher_macs_s"] / TEACHER_MACS  # a step is bound by its teachers' forward passes
    cached_ips = h["student_macs_s"] / (STUDENT_MACS * 3)
    per_image_ms = m["decode_ms"] + m["crop_ms"]
    cores_live, cores_cached = live_ips * per_image_ms / 1e3, cached_ips * per_image_ms / 1e3
    cache_bytes = n * k * 3 * IMAGENET["classes"] * 2
    build_gpu_h = n * k * TEACHER_MACS / h["teacher_macs_s"] / 3600
    epoch_live_gpu_h = n * TEACHER_MACS / h["teacher_macs_s"] / 3600
    jpeg = IMAGENET["bytes"] / n
    lines = [
        "# At scale, on paper: ImageNet-1k at 224 px", "",
        f"Written by `python experiments/scale_numbers.py --views {views}`. Measured here: one core of this machine "
        "(AMD EPYC, `torch.set_num_threads(1)`). H100: the project's own figures from the teacher-cache study "
        "(docs/TEACHER-CACHE.md), where ten runs shared one GPU, so they are lower bounds for one run. "
        "Every other figure is arithmetic on these, shown.", "",
        "## What was measured", "",
        f"- Decoding a {m['jpeg_bytes'] / 1e3:.0f} KB 500x375 JPEG into the 224 px student's canonical view "
        f"(shorter side 256, centre 256x256; ekdc's `decode_image`): **{m['decode_ms']:.2f} ms** a core "
        f"(median of 3 passes over {m['photos']} images: {', '.join(f'{x:.2f}' for x in m['decode_rounds_ms'])}).",
        f"- Its RandomResizedCrop to 224 (`resized_crop_batch`, batch of 64): {m['crop_ms']:.2f} ms an image.",
        f"- Reading a tar shard from local disk: {m['tar_read_mb_s']:,.0f} MB/s (page cache warm: an upper bound).",
        f"- H100, 3 teachers' forward passes (bf16): {h['teacher_macs_s'] / 1e12:.2f} TMAC/s (5,000 images x 10 views "
        f"x 782.3M MACs in {h['build_s']:.1f} s).",
        f"- H100, student training (forward + backward, about 3x the forward's MACs): "
        f"{h['student_macs_s'] / 1e12:.2f} TMAC/s (30 x 5,000 images x 41.3M MACs x 3 in {h['student_s']:.0f} s).", "",
        "## Images a second a GPU needs, and the CPU cores that feed it", "",
        f"- Live teachers (3 x 4.1 GMACs = {TEACHER_MACS / 1e9:.1f} GMACs an image): "
        f"{h['teacher_macs_s'] / 1e12:.2f}e12 / {TEACHER_MACS:.3g} = **{live_ips:,.0f} images/s** a GPU, bound by "
        "the teachers (the student's step is small beside them).",
        f"- Teachers from the cache (the student alone, {STUDENT_MACS / 1e6:.1f}M MACs x 3): "
        f"{h['student_macs_s'] / 1e12:.2f}e12 / {STUDENT_MACS * 3:.3g} = **{cached_ips:,.0f} images/s** a GPU.",
        f"- Decode and crop: {m['decode_ms']:.2f} + {m['crop_ms']:.2f} = {per_image_ms:.2f} ms a core an image, so a "
        f"GPU needs {live_ips:,.0f} x {per_image_ms:.2f} / 1000 = **{cores_live:.1f} cores** with live teachers and "
        f"{cached_ips:,.0f} x {per_image_ms:.2f} / 1000 = **{cores_cached:.1f} cores** with the cache. An 8-GPU node "
        f"with the cache needs {8 * cores_cached:.0f} decoding cores: more than most nodes have (GPU decoding, "
        "smaller stored JPEGs or a pre-resized copy is then the way).", "",
        "## When the teacher-output cache pays for itself", "",
        f"- Size, logits only, fp16, {k} views: {n:,} images x {k} views x 3 teachers x 1,000 classes x 2 bytes = "
        f"**{cache_bytes / 1e9:,.1f} GB** (features would add 3 x 2,048 x 2 bytes a view for ResNet-50-sized teachers).",
        f"- Build: {n:,} x {k} views x {TEACHER_MACS:.3g} MACs / {h['teacher_macs_s']:.3g} MAC/s = "
        f"**{build_gpu_h:,.0f} GPU-hours**; one live epoch's teachers cost {epoch_live_gpu_h:,.1f} GPU-hours. The cache "
        f"pays for itself after {k} epochs of one student (then every epoch, seed or student after that is the "
        "student alone); a recipe of fewer epochs than views should keep the teachers live.",
        f"- Reading it: each epoch reads {n * 3 * IMAGENET['classes'] * 2 / 1e9:.1f} GB of the cache (one view an "
        "image): on a shared file system, this is the cache's cost at scale.", "",
        "## Shards", "",
        f"- ImageNet's training JPEGs take {IMAGENET['bytes'] / 1e9:.0f} GB, {jpeg / 1e3:.0f} KB an image. Shards of "
        f"about 1 GB hold {1e9 / jpeg:,.0f} images: {n / (1e9 / jpeg):,.0f} shards.",
        "- Each rank takes every W-th shard and each loader worker every n-th of those: a worker needs one shard of its "
        "own at least, and the shuffle mixes within a worker's shards only, so there must be several shards per "
        "worker: shards >= GPUs x workers x 4.", "",
        "## What breaks first", "",
    ]
    for gpus in (8, 64, 512):
        per_gpu = n / gpus
        readers = gpus * 8
        shards_needed = readers * 4
        shard_imgs = n / shards_needed
        epoch_s = per_gpu / cached_ips
        lines.append(
            f"- **{gpus} GPUs** ({gpus // 8} nodes of 8, 8 loader workers a GPU): {per_gpu:,.0f} images a GPU an epoch; "
            f"{readers:,} readers need >= {shards_needed:,} shards, so {shard_imgs:,.0f} images ({shard_imgs * jpeg / 1e6:,.0f} "
            f"MB) a shard at most. With the cache an epoch takes {epoch_s:,.0f} s and reads "
            f"{n * 3 * IMAGENET['classes'] * 2 / 1e9 / epoch_s:,.1f} GB/s of cache and {IMAGENET['bytes'] / 1e9 / epoch_s:,.1f} GB/s "
            f"of JPEGs from the shared file system; decoding needs {gpus * cores_cached:,.0f} cores in all.")
    lines += [
        "", "Read in that order: at 8 GPUs the decoding cores of a node break first (the cache makes the GPU outrun its "
        "CPUs); at 64 GPUs the shared file system's bandwidth for the JPEGs and the cache follows; at 512 GPUs an epoch "
        "lasts seconds, so the per-epoch start of loader workers, the shard count (small shards, many files) and the "
        "all-reduce of a 0.25M-parameter student each step dominate, and a rank waiting on another rank's cache build "
        "hits the process group's timeout (docs/DESIGN-NOTES.md).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--views", type=int, default=10)
    args = ap.parse_args(argv)
    m, h = measure(args.images), h100_figures()
    (ROOT / "docs" / "scale.json").write_text(json.dumps({"measured": m, "h100": h}, indent=1))
    (ROOT / "docs" / "SCALE.md").write_text(page(m, h, args.views))
    print("wrote docs/SCALE.md")


if __name__ == "__main__":
    main()
