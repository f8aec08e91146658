"""`ekdc export`: the ONNX contract, parity, fp16/int8 files, the teacher ensemble, bad input."""
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from ekdc import UserError
from ekdc.contract import ort_session as session
from tests.conftest import run_cli


def test_manifest_and_files(tiny_export):
    out, manifest = tiny_export
    assert json.loads((out / "manifest.json").read_text()) == manifest
    names = {f["file"]: f for f in manifest["files"]}
    assert set(names) == {"student.onnx", "teachers.onnx", "student.fp16.onnx", "student.int8.onnx"}
    assert manifest["fold"]["choice"] in ("grouped", "separate")
    assert set(manifest["fold"]["timings_ms"]) == {"grouped", "separate"}
    assert manifest["fold"]["int8_choice"] in ("grouped", "separate")
    s = names["student.onnx"]["parity"]
    assert s["max_abs_diff"] <= 1e-4 and s["argmax_agreement"] == 1.0
    assert names["student.fp16.onnx"]["parity"]["argmax_agreement"] >= 0.995
    assert "accuracy_change" in names["student.int8.onnx"]
    assert not list(out.glob(".ekdc-export-*"))  # temporary files cleaned up


@pytest.mark.parametrize("fname, precision", [("student.onnx", "fp32"), ("student.fp16.onnx", "fp16"),
                                              ("student.int8.onnx", "int8"), ("teachers.onnx", "fp32")])
def test_contract(tiny_export, fname, precision):
    out, manifest = tiny_export
    path = out / fname
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "images" and outp.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT == outp.type.tensor_type.elem_type
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["ekdc.classes"]) == manifest["classes"]
    assert meta["ekdc.input_size"] == "16" and meta["ekdc.precision"] == precision
    assert meta["ekdc.kind"] == ("teachers" if fname == "teachers.onnx" else "student")
    assert meta["ekdc.recipe"] == "tiny"
    assert json.loads(meta["ekdc.preprocess"]) == {"exif_orientation": True, "resize": 16}  # what a client does first
    sess = session(path)
    for b in (1, 3, 64):
        x = np.random.default_rng(b).random((b, 3, 16, 16), dtype=np.float32)
        (y,) = sess.run(["logits"], {"images": x})
        assert y.shape == (b, 4) and y.dtype == np.float32


def test_student_onnx_matches_pytorch_student(tiny_run, tiny_export):
    from ekdc.checkpoint import load_student

    out, _ = tiny_export
    student, ck = load_student(tiny_run / "student.pt")
    x = torch.rand(8, 3, 16, 16)
    norm = (x - torch.tensor(ck["mean"]).view(1, 3, 1, 1)) / torch.tensor(ck["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = student(norm).numpy()
    (y,) = session(out / "student.onnx").run(["logits"], {"images": x.numpy()})
    assert np.abs(y - ref).max() <= 1e-4


def test_teachers_onnx_is_mean_of_teacher_logits(tiny_run, tiny_export):
    from ekdc.checkpoint import load_teacher

    out, manifest = tiny_export
    x = torch.rand(5, 3, 16, 16)
    norm = (x - torch.tensor(manifest["mean"]).view(1, 3, 1, 1)) / torch.tensor(manifest["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = [load_teacher(tiny_run / "teachers" / f"{n}.pt", n)[0].eval()(norm) for n in ("resnet8", "wrn_16_2")]
    (y,) = session(out / "teachers.onnx").run(["logits"], {"images": x.numpy()})
    assert np.abs(y - torch.stack(logits).mean(0).numpy()).max() <= 1e-4


def test_export_cli_fixed_fold(tiny_run, tmp_path):
    res = run_cli("export", tiny_run, "--out", tmp_path / "e", "--fold", "separate")
    assert res.returncode == 0, res.stderr
    assert "student.onnx" in res.stdout and "teachers.onnx" in res.stdout
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["fold"] == {"mode": "separate", "choice": "separate"}


def test_a_student_whose_teachers_are_elsewhere_exports_with_no_teachers(tiny_run, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(tiny_run, run)
    for f in (run / "teachers").glob("*.pt"):
        f.unlink()  # trained on another machine: only the student came back
    res = run_cli("export", run, "--out", tmp_path / "e", "--fold", "grouped")
    assert res.returncode == 2 and "--no-teachers" in res.stderr and "Traceback" not in res.stderr
    # into a folder holding another export's teachers.onnx: it must not stay beside this student
    assert run_cli("export", tiny_run, "--out", tmp_path / "e", "--fold", "grouped").returncode == 0
    assert (tmp_path / "e" / "teachers.onnx").exists()
    res = run_cli("export", run, "--out", tmp_path / "e", "--fold", "grouped", "--no-teachers")
    assert res.returncode == 0, res.stderr
    files = [f["file"] for f in json.loads((tmp_path / "e" / "manifest.json").read_text())["files"]]
    assert files == ["student.onnx"] and not (tmp_path / "e" / "teachers.onnx").exists()
    # a teachers.onnx the user copied in (no manifest lists it) is theirs: it stays, and export says so
    (tmp_path / "e" / "teachers.onnx").write_bytes(b"the user's reference")
    res = run_cli("export", run, "--out", tmp_path / "e", "--fold", "grouped", "--no-teachers")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "e" / "teachers.onnx").read_bytes() == b"the user's reference"
    assert "kept" in res.stdout and "teachers.onnx" in res.stdout


def test_export_bad_input(tiny_run, tmp_path):
    def one_line(res, words):
        assert res.returncode == 2, (res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr and words in lines[0], lines

    one_line(run_cli("export", "--runs", tmp_path / "no-runs"), "no run found")
    one_line(run_cli("export", tmp_path / "missing-run"), "run folder not found")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    one_line(run_cli("export", tmp_path / "img.png"), "img.png is a file; ekdc export reads a run folder")
    half = tmp_path / "half"
    half.mkdir()
    (half / "recipe.yaml").write_text((tiny_run / "recipe.yaml").read_text())
    one_line(run_cli("export", half), "no trained student")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "recipe.yaml").write_text((tiny_run / "recipe.yaml").read_text())
    (corrupt / "student.pt").write_bytes(b"\x80\x04garbage")
    one_line(run_cli("export", corrupt), "corrupt")
    one_line(run_cli("export", tiny_run, "--out", "/proc/ekdc-no"), "not writable")
    (tmp_path / "notes.txt").write_text("mine")
    one_line(run_cli("export", tiny_run, "--out", tmp_path / "notes.txt"), "notes.txt is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    one_line(run_cli("export", tiny_run, "--fold", "diagonal"), "--fold")
    one_line(run_cli("export", tiny_run, "--out", tmp_path / "p", "--parity-images", "-5"), "--parity-images must be >= 0")
    from ekdc import UserError
    from ekdc.deploy.tensorrt import check_tensorrt_available

    try:  # where TensorRT and a GPU are there, --trt builds an engine: nothing to refuse
        check_tensorrt_available()
    except UserError:
        one_line(run_cli("export", tiny_run, "--out", tmp_path / "t", "--trt"), "--trt")
    # a QAD setting without --qad would have written PTQ's file under the name the user asked QAD for
    one_line(run_cli("export", tiny_run, "--out", tmp_path / "q", "--int8", "--qad-labels"), "applies to QAD only")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("flags, named", [((None, 0.01, False), "--qad-lr"), ((3, None, False), "--qad-epochs"),
                                           ((2, None, False), "--qad-epochs"),  # given at its default: still given
                                           ((None, None, True), "--qad-labels")])
def test_qad_flags_need_qad(flags, named):
    from ekdc.deploy.qad import QADSettings

    assert QADSettings.from_flags(False, None, None, False) is None  # none given: PTQ, nothing asked of QAD
    with pytest.raises(UserError, match=f"{named} applies to QAD only"):
        QADSettings.from_flags(False, *flags)
    epochs, lr, labels = flags
    assert QADSettings.from_flags(True, *flags) == QADSettings(epochs=epochs or 2, lr=lr, teachers=not labels)


def test_infer_example_classifies_images_without_torch(tiny_export, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import ROOT

    out, manifest = tiny_export
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(p)
        paths.append(str(p))
    # torch is made unimportable: the example must not need it
    block = tmp_path / "block"
    block.mkdir()
    (block / "torch.py").write_text("raise ImportError('no torch here')\n")
    env = {"PYTHONPATH": str(block), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, str(ROOT / "export" / "infer.py"), str(out / "student.int8.onnx"), *paths,
                          "--top", "2"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith(p) and any(c in line for c in manifest["classes"]) for line, p in zip(lines, paths))


def test_infer_example_bad_inputs_one_line_exit_2(tiny_export, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import ROOT

    out, _ = tiny_export
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20)).save(img)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    foreign = tmp_path / "foreign.onnx"  # a valid model without ekdc's metadata
    m = onnx.load(out / "student.onnx")
    del m.metadata_props[:]
    onnx.save(m, foreign)
    full = tmp_path / "full.jpg"  # a JPEG cut short: Pillow's own words ("Truncated File Read") name no file
    Image.effect_noise((64, 64), 60).convert("RGB").save(full, quality=95)
    truncated = tmp_path / "cut short.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    cases = [(tmp_path / "missing.onnx", img, "cannot load", []), (corrupt, img, "cannot load", []),
             (out / "student.onnx", truncated, f"cannot read image {truncated}", []),
             (foreign, img, "is not an ekdc export", []), (out / "student.onnx", tmp_path / "no.png", "no.png", []),
             (out / "student.onnx", img, "--top 0: must be 1 or more", ["--top", "0"]),
             (out / "student.onnx", img, "--top -1: must be 1 or more", ["--top", "-1"])]
    for model, image, words, flags in cases:
        res = subprocess.run([sys.executable, str(ROOT / "export" / "infer.py"), str(model), str(image), *flags],
                             capture_output=True, text=True)
        assert res.returncode == 2, (model, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("infer.py: error:") and words in lines[0], res.stderr


def test_export_refuses_a_fold_that_does_not_match(tiny_run, tmp_path, monkeypatch):
    """A wrong fold must never reach student.onnx: export compares it with the trained student first."""
    from ekdc.deploy import export as export_mod
    from ekdc.deploy import steps

    real_fold = steps.fold

    def broken_fold(student, layout):
        folded = real_fold(student, layout)
        with torch.no_grad():
            last = [m for m in folded.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.bias.add_(torch.linspace(0, 5, last.bias.numel()))  # e.g. heads' biases summed, not averaged
        return folded

    monkeypatch.setattr(steps, "fold", broken_fold)
    with pytest.raises(RuntimeError, match="does not match the trained student"):
        export_mod.export(tiny_run, tmp_path / "out", fold_mode="grouped", parity_images=16)
    assert not (tmp_path / "out" / "student.onnx").exists()


def test_imagenet_stem_and_inverted_residual_export_exactly(tmp_path):
    """The photo-sized student (stride-4 stem, MobileNetV2 blocks, a depthwise first branch convolution)
    trains, folds and exports with parity."""
    from ekdc import distill, export, load_recipe
    from tests.conftest import write_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data={"image_size": 32}, teachers=[
        {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32}}, {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32}}],
        student={"trunk_width": 8, "branch_widths": [8, 16], "stem": "imagenet", "block": "inverted_residual",
                 "expand_ratio": 1}))
    run = distill(recipe, tmp_path / "run", progress=False)
    ck = torch.load(run.path / "student.pt", weights_only=True)
    assert (ck["stem"], ck["block"], ck["config"]["expand_ratio"]) == ("imagenet", "inverted_residual", 1)
    for layout in ("grouped", "separate"):
        manifest = export(run.path, tmp_path / layout, fold_mode=layout, parity_images=16)
        entry = manifest["files"][0]
        assert entry["parity"]["max_rel_diff"] < 1e-4 and entry["parity"]["argmax_agreement"] == 1.0


def test_failed_export_leaves_the_folder_as_it_was(tiny_run, tmp_path, monkeypatch):
    from ekdc import export
    from ekdc.deploy import export as export_mod

    out = tmp_path / "e"
    export(tiny_run, out, int8=True, fold_mode="grouped", parity_images=16, calib_images=16)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "student.int8.onnx" in before

    def teachers_fail(job):  # fails after student.onnx is made, before anything is published
        raise export_mod.UserError("teachers cannot be exported")

    monkeypatch.setattr(export_mod, "export_teachers", teachers_fail)
    with pytest.raises(export_mod.UserError):
        export(tiny_run, out, fold_mode="separate", parity_images=16)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    monkeypatch.undo()
    manifest = export(tiny_run, out, fold_mode="separate", parity_images=16)  # no --int8 this time
    assert not (out / "student.int8.onnx").exists()  # an earlier export's file does not linger beside this one
    assert {f["file"] for f in manifest["files"]} == {p.name for p in out.iterdir() if p.suffix == ".onnx"}


def test_the_int8_file_says_what_the_manifest_says(tiny_export):
    """A client holding only the int8 file reads its form and its measured cost in its own metadata."""
    import onnx

    out, manifest = tiny_export
    entry = next(f for f in manifest["files"] if f["file"] == "student.int8.onnx")
    meta = {p.key: p.value for p in onnx.load(str(out / "student.int8.onnx")).metadata_props}
    q = json.loads(meta["ekdc.quantization"])
    assert q == entry["quantization"] and q["form"].startswith("onnxruntime-qdq")
    assert q["accuracy"] == entry["accuracy"] and q["argmax_agreement_vs_fp32"] == entry["parity"]["argmax_agreement"]
    assert json.loads(meta["ekdc.classes"]) == manifest["classes"]  # the rest of the contract kept
