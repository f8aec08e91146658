"""Teachers from anywhere: torchvision and timm models from weight files saved as their training scripts
save them, and ONNX models from another framework. Nothing is downloaded: every weight is random and
made here."""
import argparse
import json
import os
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import run_cli, tiny_recipe

CLASSES = [f"class_{i}" for i in range(4)]
ONNX_ORDER = ["class_2", "class_0", "extra", "class_3", "class_1"]  # another order, and one class the data lacks
ONNX_SIZE, ONNX_MEAN, ONNX_STD = 20, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def save_like_torchvision(path, model):
    """torchvision's references/classification/train.py: the weights under 'model', its args beside them."""
    args = argparse.Namespace(model="resnet18", data_path=pathlib.Path("/datasets/imagenet"), lr=0.1, epochs=90)
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 89, "args": args}, path)


def save_like_timm(path, model, arch):
    """timm's train.py: the weights under 'state_dict', with the arch name, its args and the metric."""
    args = argparse.Namespace(model=arch, data_dir=pathlib.PurePosixPath("/data"), lr=0.05, output="")
    torch.save({"epoch": 9, "arch": arch, "state_dict": model.state_dict(), "optimizer": {}, "version": 2,
                "args": args, "metric": 12.5}, path)


class _ForeignNet(torch.nn.Module):
    """A model as another framework would ship it: NHWC, BGR, its own size and normalisation, softmax."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, len(ONNX_ORDER))

    def forward(self, x_nhwc):
        x = F.relu(self.conv(x_nhwc.permute(0, 3, 1, 2)))
        return torch.softmax(self.fc(x.mean((2, 3))), -1)


def export_foreign(path, dynamic_batch=True):
    """The legacy exporter at a low opset, batch dynamic or fixed at 1."""
    net = _ForeignNet().eval()
    kw = {"dynamic_axes": {"input": {0: "n"}, "probs": {0: "n"}}} if dynamic_batch else {}
    torch.onnx.export(net, (torch.rand(1, ONNX_SIZE, ONNX_SIZE, 3),), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["probs"], **kw)
    return path


def onnx_entry(path, **over):
    return {"onnx": str(path), "input_size": ONNX_SIZE, "mean": ONNX_MEAN, "std": ONNX_STD, "channel_order": "bgr",
            "layout": "nhwc", "outputs": "probabilities", "classes": ONNX_ORDER, **over}


def foreign_expected(path, pixels):
    """What the ONNX teacher must give: its own preprocessing by hand, ONNX Runtime, log, the data's order."""
    x = F.interpolate(pixels, size=(ONNX_SIZE, ONNX_SIZE), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(ONNX_MEAN).view(1, 3, 1, 1)) / torch.tensor(ONNX_STD).view(1, 3, 1, 1)
    x = x.flip(1).permute(0, 2, 3, 1).numpy()  # RGB -> BGR, NCHW -> NHWC
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    return np.log(probs)[:, [ONNX_ORDER.index(c) for c in CLASSES]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import timm
    import torchvision

    d = tmp_path_factory.mktemp("teacher_files")
    save_like_torchvision(d / "tv_resnet18.pth", torchvision.models.resnet18(weights=None))
    save_like_timm(d / "timm_test_resnet.pth.tar", timm.create_model("test_resnet", pretrained=False), "test_resnet")
    return {"tv": d / "tv_resnet18.pth", "timm": d / "timm_test_resnet.pth.tar",
            "onnx": export_foreign(d / "foreign.onnx"), "onnx_b1": export_foreign(d / "foreign_b1.onnx", False), "dir": d}


def test_weight_files_with_args_load_safely(files):
    from ekdc.teachers.weights import read_weights

    sd, fields = read_weights(files["tv"], "w")
    assert "fc.weight" in sd and isinstance(fields["args"], argparse.Namespace)
    sd, fields = read_weights(files["timm"], "w")
    assert fields["arch"] == "test_resnet" and isinstance(fields["args"].data_dir, pathlib.PurePosixPath)
    evil = files["dir"] / "evil.pt"
    torch.save({"state_dict": {}, "hook": os.system}, evil)  # a callable: never loaded, never run
    with pytest.raises(Exception, match="does not load"):
        read_weights(evil, "w")


def test_onnx_teacher_targets_equal_its_outputs_mapped_to_the_data(files):
    from ekdc.recipe import TeacherConfig
    from ekdc.teachers import DataInfo, frozen_teacher

    data = DataInfo(CLASSES, 16, [0.5] * 3, [0.25] * 3)
    pixels = torch.rand(5, 3, 16, 16)
    for key in ("onnx", "onnx_b1"):  # a dynamic batch, and one fixed at 1 (run sample by sample)
        t = frozen_teacher(TeacherConfig(name="f", **onnx_entry(files[key])), 0, data)
        with torch.inference_mode():
            got = t(pixels).numpy()
        np.testing.assert_allclose(got, foreign_expected(files[key], pixels), rtol=1e-5, atol=1e-5)
        assert not t.has_features and t.source == "onnx"


def _mixed_recipe(files, **over):
    r = tiny_recipe(**over)
    r["teachers"] = [
        {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
        {"arch": "torchvision:resnet18", "weights": str(files["tv"]), "input_size": 32,
         "train": {"epochs": 1, "batch_size": 32, "lr": 0.01}},
        {"arch": "timm:test_resnet", "weights": str(files["timm"]), "input_size": 24, "mean": [0.5] * 3, "std": [0.5] * 3,
         "train": {"epochs": 1, "batch_size": 32, "lr": 0.01}, "freeze_backbone": True},
        onnx_entry(files["onnx_b1"]),
    ]
    r["distill"]["epochs"] = 1
    return r


def test_mixed_ensemble_distill_export_bench(files, tmp_path):
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(yaml.safe_dump(_mixed_recipe(files, mode="avg_kd")))
    res = run_cli("distill", recipe, "--out", tmp_path / "run", "-q")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    by = {t["name"]: t for t in m["teachers"]}
    assert [by[n]["source"] for n in ("resnet8", "resnet18", "test_resnet", "foreign_b1")] == \
        ["registry", "torchvision", "timm", "onnx"]
    assert [by[n]["input_size"] for n in ("resnet8", "resnet18", "test_resnet", "foreign_b1")] == [16, 32, 24, ONNX_SIZE]
    assert by["foreign_b1"]["macs"] == ONNX_SIZE * ONNX_SIZE * 8 * 27 + 8 * len(ONNX_ORDER)  # from the graph
    ck = torch.load(tmp_path / "run" / "teachers" / "resnet18.pt", weights_only=True)
    assert ck["classes"] == CLASSES and ck["state_dict"]["fc.weight"].shape == (4, 512)  # re-headed for the data
    res = run_cli("export", tmp_path / "run", "--out", tmp_path / "export", "--fold", "grouped")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    teachers_entry = next(f for f in manifest["files"] if f["file"] == "teachers.onnx")
    assert teachers_entry["parity"]["max_rel_diff"] < 1e-4 and teachers_entry["parity"]["argmax_agreement"] == 1.0
    # the one graph equals the mean of the teachers run one by one
    from ekdc.recipe import load_recipe
    from ekdc.run import RunDir
    from ekdc.checkpoint import teacher_for_run
    from ekdc.teachers import DataInfo

    r = load_recipe(tmp_path / "run" / "recipe.yaml")
    info = DataInfo(CLASSES, 16, manifest["mean"], manifest["std"])
    teachers = [teacher_for_run(t, i, info, RunDir(tmp_path / "run")) for i, t in enumerate(r.teachers)]
    pixels = torch.rand(6, 3, 16, 16)
    with torch.inference_mode():
        want = torch.stack([t(pixels) for t in teachers]).mean(0).numpy()
    proto = onnx.load(str(tmp_path / "export" / "teachers.onnx"))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
    got = ort.InferenceSession(str(tmp_path / "export" / "teachers.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"images": pixels.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    res = run_cli("bench", tmp_path / "export" / "student.onnx", "--batch", "1,4", "--runs", "3", "--repeats", "1")
    assert res.returncode == 0, res.stderr


def _one_line(res, words):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert words in lines[0], lines[0]


def test_pretrained_offline_is_one_line(tmp_path):
    r = tiny_recipe()
    r["teachers"] = [{"arch": "torchvision:resnet18", "pretrained": True, "train": {"epochs": 1}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "empty-torch-home")}
    import subprocess
    import sys

    for arch in ("torchvision:resnet18", "timm:test_resnet"):
        res = subprocess.run([sys.executable, "-m", "ekdc", "distill", str(tmp_path / "r.yaml"), "--out",
                              str(tmp_path / arch.replace(":", "_")), "--set", f"teachers.0.arch={arch}"],
                             capture_output=True, text=True, env=env, timeout=180)
        _one_line(res, "could not get the pretrained weights")
        assert "weights:" in res.stderr


@pytest.mark.parametrize("case, words", [
    ({"arch": "torchvision:resnet19"}, "unknown torchvision model 'resnet19' (closest: torchvision:resnet18"),
    ({"arch": "timm:test_resnett"}, "unknown timm model 'test_resnett' (closest: timm:test_resnet"),
    ({"arch": "torchvision:resnet18", "weights": "{timm}"}, "does not fit torchvision:resnet18"),
    ({"onnx": "{onnx}", "arch": "resnet8"}, "give exactly one of arch"),
    ({"onnx": "{no_image}"}, "expected float32"),
    ({**onnx_entry("{onnx}"), "classes": ["class_0", "class_1", "class_2", "x", "y"]}, "lack the data's class 'class_3'"),
    ({"onnx": "{onnx}", "train": {"epochs": 1}}, "train: does not apply to an onnx: teacher"),
    ({"arch": "torchvision:resnet18", "weights": "{tv}"}, "give it train: to fine-tune a new head"),
    ({"arch": "torchvision:resnet18"}, "has no weights: give pretrained:, weights:, or train:"),
    ({"arch": "resnet8", "freeze_backbone": True}, "freeze_backbone: needs a teacher that starts from weights"),
    ({**onnx_entry("{onnx_b1}"), "input_size": 24}, "the graph takes 20x20 images"),
    ({"arch": "timm:vit_tiny_patch16_224", "weights": "{vit}", "input_size": 32, "train": {"epochs": 1}},
     "does not run on 32x32 images"),
    ({"arch": "resnet8", "weights": "{odd_fields}"}, "the file's 'classes' is not a list of distinct class names"),
])
def test_bad_teachers_are_one_line(files, tmp_path, case, words):
    no_image = files["dir"] / "no_image.onnx"
    if not no_image.exists():
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Identity", ["tokens"], ["out"])], "g",
                              [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, [1, 8])])
        onnx.save(helper.make_model(g), str(no_image))
    vit, odd = files["dir"] / "vit.pth", files["dir"] / "odd.pt"
    if not vit.exists():
        import timm

        torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), vit)  # fixed to 224 px
        from ekdc.models import create_model

        torch.save({"state_dict": create_model("resnet8", num_classes=4).state_dict(), "classes": 4}, odd)
    paths = {"timm": files["timm"], "onnx": files["onnx"], "no_image": no_image, "tv": files["tv"],
             "onnx_b1": files["onnx_b1"], "vit": vit, "odd_fields": odd}
    entry = {k: (v.format(**paths) if isinstance(v, str) else v) for k, v in case.items()}
    r = tiny_recipe()
    r["teachers"] = [entry]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    _one_line(run_cli("distill", tmp_path / "r.yaml", "--out", tmp_path / "run"), words)


def test_models_lists_and_searches_every_source():
    res = run_cli("models")
    assert res.returncode == 0 and "resnet56" in res.stdout and "torchvision:" in res.stdout and "timm:" in res.stdout
    res = run_cli("models", "--filter", "resnet1*")
    assert res.returncode == 0
    names = res.stdout.split()
    assert {"resnet110", "torchvision:resnet18", "timm:resnet18"} <= set(names) and "resnet56" not in names


def _hand_made_onnx(path, *, fp16_out=False, if_branch=False):
    """A tiny [N,3,8,8] -> [N,4] classifier built node by node: its output may be fp16, and it may pass its
    logits through an If whose branches read a tensor of the graph around them (a captured name)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["logits_f"])]
    out, out_type = "logits_f", TensorProto.FLOAT
    if if_branch:
        branch = lambda tag: helper.make_graph(  # noqa: E731
            [helper.make_node("Identity", ["logits_f"], [f"{tag}_out"])], tag, [],
            [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, None)])
        nodes += [helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c")),
                  helper.make_node("If", ["cond"], ["chosen"], then_branch=branch("then"), else_branch=branch("else"))]
        out = "chosen"
    if fp16_out:
        nodes.append(helper.make_node("Cast", [out], ["half"], to=TensorProto.FLOAT16))
        out, out_type = "half", TensorProto.FLOAT16
    g = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info(out, out_type, ["n", 4])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_composed_teachers_handle_fp16_outputs_and_captured_names(tmp_path):
    from ekdc.deploy.compose import compose_teachers
    from ekdc.recipe import TeacherConfig
    from ekdc.teachers import DataInfo, frozen_teacher

    data = DataInfo(CLASSES, 16, [0.5] * 3, [0.25] * 3)
    teachers = [frozen_teacher(TeacherConfig(name=f"h{i}", onnx=str(_hand_made_onnx(tmp_path / f"h{i}.onnx", **kw)),
                                             input_size=8), i, data)
                for i, kw in enumerate([{"fp16_out": True}, {"if_branch": True}])]
    proto = compose_teachers(None, teachers, 2, 16)
    onnx.checker.check_model(proto, full_check=True)
    pixels = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        want = torch.stack([t(pixels) for t in teachers]).mean(0).numpy()
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"images": pixels.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # the fp16 teacher rounds its own outputs


def test_an_ekdc_export_teaches_as_it_is(tiny_export):
    """ekdc's own files (a student, teachers.onnx, the int8 file) as ONNX teachers: their metadata says RGB
    in [0,1] with the normalisation inside, their classes and input size, so no recipe key is needed, and
    the data's classes in another order are mapped by those names."""
    from ekdc.recipe import TeacherConfig
    from ekdc.teachers import DataInfo, frozen_teacher

    out, manifest = tiny_export
    classes, size = manifest["classes"], manifest["input_size"]
    pixels = torch.rand(6, 3, size, size)
    for name in ("student.onnx", "teachers.onnx", "student.int8.onnx"):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        want = sess.run(None, {"images": pixels.numpy()})[0]
        for order in (classes, classes[::-1]):
            data = DataInfo(order, size, [0.5] * 3, [0.25] * 3)  # the data's own normalisation: not the file's
            t = frozen_teacher(TeacherConfig(name="e", onnx=str(out / name)), 0, data)
            with torch.inference_mode():
                got = t(pixels).numpy()
            np.testing.assert_allclose(got, want[:, [classes.index(c) for c in order]], rtol=1e-4, atol=1e-4)


def test_a_fastnet_fine_tuned_from_weights_keeps_its_own_rates(tmp_path):
    """FastNet trains its BatchNorm shifts at 64x (with 1/64 the decay): a second cycle from its weights
    keeps that, with the backbone at backbone_lr_scale and the head at the schedule's rate."""
    from ekdc.models import create_model
    from ekdc.recipe import TeacherConfig
    from ekdc.teachers import DataInfo, trainable_teacher
    from ekdc.teachers.build import teacher_param_groups

    path = tmp_path / "fastnet_s.pt"
    torch.save(create_model("fastnet_s", num_classes=4).state_dict(), path)
    data = DataInfo(CLASSES, 16, [0.5] * 3, [0.25] * 3)

    def rates(**over):
        tcfg = TeacherConfig(arch="fastnet_s", weights=str(path), train={"epochs": 1}, **over)
        t = trainable_teacher(tcfg, 0, data)
        shifts = {id(m.bias) for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        head = {id(p) for p in t.head.parameters()}
        seen = {}
        for g in teacher_param_groups(t, tcfg):
            for p in g["params"]:
                kind = "head" if id(p) in head else "shift" if id(p) in shifts else "other"
                seen.setdefault(kind, set()).add((g["lr_scale"], g.get("wd_scale", 1.0)))
        return seen

    assert rates(backbone_lr_scale=1.0) == {"head": {(1.0, 1.0)}, "shift": {(64.0, 1 / 64)}, "other": {(1.0, 1.0)}}
    assert rates(backbone_lr_scale=0.5) == {"head": {(1.0, 1.0)}, "shift": {(32.0, 1 / 64)}, "other": {(0.5, 1.0)}}
    assert rates(freeze_backbone=True) == {"head": {(1.0, 1.0)}}  # a linear probe trains the head alone


@pytest.mark.parametrize("arch", ["fastnet_s", "resnet8"])
def test_a_registry_teacher_re_headed_for_other_classes_keeps_its_weights(tmp_path, arch):
    """Weights of 10 classes fine-tuned on 4: only the final Linear is new (of the same kind: FastNet's has no
    bias); the backbone is the file's (a fresh network here trained from random at backbone_lr_scale)."""
    from ekdc.models import create_model
    from ekdc.recipe import TeacherConfig
    from ekdc.teachers import DataInfo, trainable_teacher

    torch.manual_seed(1)
    source = create_model(arch, num_classes=10)
    path = tmp_path / f"{arch}.pt"
    torch.save(source.state_dict(), path)
    t = trainable_teacher(TeacherConfig(arch=arch, weights=str(path), train={"epochs": 1}), 0,
                          DataInfo(CLASSES, 16, [0.5] * 3, [0.25] * 3))
    got, want = t.model.state_dict(), source.state_dict()
    assert t.from_weights and t.head is t.model.fc and t.head.out_features == 4
    assert (t.head.bias is None) == (source.fc.bias is None)
    backbone = [k for k in want if not k.startswith("fc.")]
    assert backbone and all(torch.equal(got[k], want[k]) for k in backbone)
