"""``ekdc bench`` on tiny hand-built ONNX files that follow the export contract (no torch, no training).

The tiny graphs: images -> (x - mean) / std -> Conv(3->w, 3x3, pad 1) -> Relu -> GlobalAveragePool ->
Flatten -> Gemm(w->10). The "teachers" file averages two such branches. At 16x16 one branch has
w*27 + w conv parameters and w*10 + 10 head parameters; its MACs per image are 16*16*w*27 + w*10.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from ekdc.errors import UserError

SIZE, CLASSES = 16, 10
STUDENT_W, TEACHER_WS = 8, (16, 24)
FAST = dict(batches=(1, 4), runs=3, repeats=2, warmup=1, threads=1)


def branch_params(w: int) -> int:
    return w * 27 + w + w * CLASSES + CLASSES


def branch_macs(w: int) -> int:
    return SIZE * SIZE * w * 27 + w * CLASSES


# --------------------------------------------------------------------------------------------------
# building contract-compliant ONNX files


def _branch(tag: str, w: int, rng, nodes: list, inits: list, fp16_weights: bool) -> str:
    """One conv branch reading ``x_norm``; returns the name of its [1,10] logits."""
    def weight(name: str, arr: np.ndarray) -> str:
        if not fp16_weights:
            inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
            return name
        # weights stored in fp16 and cast up at run time: a Cast chain the MAC counter must follow
        inits.append(numpy_helper.from_array(arr.astype(np.float16), name + "_h"))
        nodes.append(helper.make_node("Cast", [name + "_h"], [name], to=TensorProto.FLOAT))
        return name

    cw = weight(f"{tag}_conv_w", rng.normal(0, 0.3, (w, 3, 3, 3)))
    cb = weight(f"{tag}_conv_b", rng.normal(0, 0.1, (w,)))
    fw = weight(f"{tag}_fc_w", rng.normal(0, 0.3, (CLASSES, w)))
    fb = weight(f"{tag}_fc_b", rng.normal(0, 0.1, (CLASSES,)))
    nodes += [
        helper.make_node("Conv", ["x_norm", cw, cb], [f"{tag}_c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", [f"{tag}_c"], [f"{tag}_r"]),
        helper.make_node("GlobalAveragePool", [f"{tag}_r"], [f"{tag}_g"]),
        helper.make_node("Flatten", [f"{tag}_g"], [f"{tag}_f"]),
        helper.make_node("Gemm", [f"{tag}_f", fw, fb], [f"{tag}_o"], transB=1),
    ]
    return f"{tag}_o"


def make_model(path: Path, widths: tuple[int, ...], *, kind: str, precision: str = "fp32", seed: int = 0,
               run_dir: Path | None = None, fp16_weights: bool = False, input_name: str = "images") -> Path:
    rng = np.random.default_rng(seed)
    nodes: list = [helper.make_node("Sub", [input_name, "mean"], ["x_sub"]),
                   helper.make_node("Div", ["x_sub", "std"], ["x_norm"])]
    inits = [numpy_helper.from_array(np.full((1, 3, 1, 1), 0.5, np.float32), "mean"),
             numpy_helper.from_array(np.full((1, 3, 1, 1), 0.25, np.float32), "std")]
    outs = [_branch(f"b{i}", w, rng, nodes, inits, fp16_weights) for i, w in enumerate(widths)]
    if len(outs) == 1:
        nodes.append(helper.make_node("Identity", [outs[0]], ["logits"]))
    else:
        inits.append(numpy_helper.from_array(np.array(1.0 / len(outs), np.float32), "inv_n"))
        nodes.append(helper.make_node("Sum", outs, ["sum"]))
        nodes.append(helper.make_node("Mul", ["sum", "inv_n"], ["logits"]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    set_meta(model, kind=kind, precision=precision, run_dir=run_dir)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def set_meta(model, *, kind: str, precision: str, run_dir: Path | None) -> None:
    meta = {"ekdc.classes": json.dumps([f"class_{i}" for i in range(CLASSES)]), "ekdc.input_size": str(SIZE),
            "ekdc.kind": kind, "ekdc.precision": precision, "ekdc.recipe": "tinybench"}
    if run_dir is not None:
        meta["ekdc.run_dir"] = str(run_dir)
    helper.set_model_props(model, meta)


def quantize(src: Path, dst: Path, run_dir: Path) -> Path:
    """Static QDQ int8 like ``ekdc export --int8``: per-channel weights, QUInt8 activations."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self):
            rng = np.random.default_rng(1)
            self._it = iter([{"images": rng.random((4, 3, SIZE, SIZE), dtype=np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    model = onnx.load(str(dst))
    set_meta(model, kind="student", precision="int8", run_dir=run_dir)
    onnx.save(model, str(dst))
    return dst


def write_recipe(path: Path) -> Path:
    recipe = {"name": "tinybench",
              "data": {"dataset": "synthetic", "num_classes": CLASSES, "num_samples": 80, "image_size": SIZE,
                       "val_per_class": 2},
              "teachers": [{"arch": "resnet8"}]}
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench")
    run = d / "run"
    run.mkdir()
    write_recipe(run / "recipe.yaml")  # a run folder, as the exported files' metadata names it
    exp = d / "export"
    exp.mkdir()
    a = {"dir": d, "run": run, "recipe": run / "recipe.yaml"}
    a["student"] = make_model(exp / "student.onnx", (STUDENT_W,), kind="student", run_dir=run)
    a["fp16"] = make_model(exp / "student.fp16.onnx", (STUDENT_W,), kind="student", precision="fp16",
                           run_dir=run, fp16_weights=True)
    a["int8"] = quantize(a["student"], exp / "student.int8.onnx", run)
    a["teachers"] = make_model(exp / "teachers.onnx", TEACHER_WS, kind="teachers", seed=1, run_dir=run)
    lonely = d / "lonely"
    lonely.mkdir()
    a["lonely"] = make_model(lonely / "student.onnx", (STUDENT_W,), kind="student")
    a["garbage"] = d / "garbage.onnx"
    a["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    a["foreign"] = make_model(d / "foreign.onnx", (STUDENT_W,), kind="student", input_name="x")  # names its own
    m = onnx.load(str(a["foreign"]))
    del m.metadata_props[:]  # and carries no ekdc metadata: a model from elsewhere
    onnx.save(m, str(a["foreign"]))
    nhwc = onnx.load(str(a["student"]))
    dims = nhwc.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[3].dim_value = SIZE, 3  # declared [B,16,16,3]: not an NCHW image input
    a["wrong_input"] = d / "nhwc.onnx"
    onnx.save(nhwc, str(a["wrong_input"]))
    return a


@pytest.fixture(scope="module")
def report(art) -> dict:
    """One library run with data, JSON and plot, shared by the checks below."""
    from ekdc.benchmark import bench

    rep = bench([art["student"], art["fp16"], art["int8"]], data=art["recipe"], json_path=art["dir"] / "b.json",
                plot_path=art["dir"] / "b.png", **FAST)
    return rep


# --------------------------------------------------------------------------------------------------
# the library


def test_report_shape_and_types(report, art):
    on_disk = json.loads((art["dir"] / "b.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    names = [m["name"] for m in report["models"]]
    assert names == ["student.onnx", "student.fp16.onnx", "student.int8.onnx", "teachers.onnx"]
    assert report["reference"] == "teachers.onnx"
    for m in report["models"]:
        for key in ("name", "path", "params", "macs", "file_mb", "peak_mem_mb", "model_mem_mb", "accuracy",
                    "latency_ms", "throughput"):
            assert key in m
        assert isinstance(m["params"], int) and isinstance(m["macs"], int)
        assert m["file_mb"] > 0 and m["peak_mem_mb"] > m["model_mem_mb"] > 0
        assert set(m["latency_ms"]) == {"1", "4"} and set(m["throughput"]) == {"1", "4"}
        for b, lat in m["latency_ms"].items():
            assert set(lat) >= {"p50", "p90", "p99", "mean"}
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert m["throughput"][b] == pytest.approx(int(b) * 1e3 / lat["mean"])
            assert m["samples"][b] == FAST["runs"] * FAST["repeats"]  # per-round samples pooled
            rounds = m["round_p50_ms"][b]
            assert len(rounds) == FAST["repeats"]
            # the spread is the rounds' own: (max - min) / median, in percent
            assert m["spread_pct"][b] == pytest.approx(100 * (max(rounds) - min(rounds)) / statistics.median(rounds), abs=0.05)
        assert m["device_mem_mb"] is None  # CPU
        assert m["gflops"] == pytest.approx(2 * m["macs"] * m["throughput"]["4"] / 1e9)
    assert set(report["speedup"]) == {"1", "4"}
    mc = report["machine"]
    assert mc["provider"] == "cpu" and mc["threads"] == 1 and mc["onnxruntime"] and mc["cpu"]


def test_ratios_match_measurements(report):
    first, ref = report["models"][0], report["models"][-1]
    assert ref["is_reference"] and not first["is_reference"]
    for b in ("1", "4"):
        assert report["speedup"][b] == pytest.approx(ref["latency_ms"][b]["p50"] / first["latency_ms"][b]["p50"])
    assert report["memory_ratio"] == pytest.approx(ref["model_mem_mb"] / first["model_mem_mb"])
    for m in report["models"]:
        vs = m["vs_reference"]
        assert vs["params_ratio"] == pytest.approx(ref["params"] / m["params"])
        assert vs["macs_ratio"] == pytest.approx(ref["macs"] / m["macs"])
        assert vs["file_ratio"] == pytest.approx(ref["file_mb"] / m["file_mb"])
    assert ref["vs_reference"]["speedup"] == {"1": 1.0, "4": 1.0}


def _with_big_weight(src: Path, dst: Path, mb: int) -> Path:
    """``src`` plus a weight of ``mb`` MB that every run reads: logits + mean(flat @ W_big)."""
    m = onnx.load(str(src))
    n = mb * 1_000_000 // 4 // 3
    m.graph.initializer.append(numpy_helper.from_array(np.random.default_rng(0).random((3, n), np.float32) * 1e-6, "W_big"))
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = ["logits_small" if o == out else o for o in node.output]
    m.graph.node.extend([
        helper.make_node("GlobalAveragePool", ["images"], ["big_pool"]), helper.make_node("Flatten", ["big_pool"], ["big_flat"]),
        helper.make_node("MatMul", ["big_flat", "W_big"], ["big_wide"]),
        helper.make_node("ReduceMean", ["big_wide"], ["big_mean"], axes=[1], keepdims=1),
        helper.make_node("Add", ["logits_small", "big_mean"], [out])])
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def test_model_memory_is_the_models_own(art, tmp_path):
    """The model's own memory is positive and grows with its weights, while Python and the runtime,
    the same in every process, are left out of it (and of the ratio)."""
    from ekdc.benchmark import bench

    small = art["lonely"]  # no data and no reference beside it: memory is all this measures
    big = _with_big_weight(small, tmp_path / "big.onnx", 60)
    rep = bench([small, big], against=small, batches=(1,), runs=2, repeats=1, warmup=1, threads=1)
    by = {m["name"]: m for m in rep["models"]}
    assert by["student.onnx"]["model_mem_mb"] > 0
    assert by["big.onnx"]["model_mem_mb"] - by["student.onnx"]["model_mem_mb"] >= 50
    assert by["big.onnx"]["vs_reference"]["memory_ratio"] < 0.2  # the ratio is the models', not the processes'


def test_params_and_macs_by_hand(report):
    by = {m["name"]: m for m in report["models"]}
    student = (branch_params(STUDENT_W), branch_macs(STUDENT_W))
    assert student == (314, 55376)
    # fp16 (weights through Cast) and int8 QDQ (weights through DequantizeLinear) count as fp32 does
    for name in ("student.onnx", "student.fp16.onnx", "student.int8.onnx"):
        assert (by[name]["params"], by[name]["macs"]) == student, name
        assert by[name]["macs_exact"]
    ref = by["teachers.onnx"]
    assert ref["params"] == sum(branch_params(w) for w in TEACHER_WS)
    assert ref["macs"] == sum(branch_macs(w) for w in TEACHER_WS)
    assert by["student.int8.onnx"]["precision"] == "int8"


def test_accuracy_matches_onnxruntime(report, art):
    import onnxruntime as ort

    from ekdc.data import load_data
    from ekdc.recipe import load_recipe

    splits = load_data(load_recipe(art["recipe"]).data)
    x, y = (splits.val_x.float() / 255).numpy(), splits.val_y.numpy()
    assert report["data"]["images"] == len(y) == 20
    for m in report["models"]:
        sess = ort.InferenceSession(m["path"], providers=["CPUExecutionProvider"])
        expected = float((sess.run(["logits"], {"images": x})[0].argmax(1) == y).mean())
        assert m["accuracy"] == pytest.approx(expected), m["name"]


def test_plot_written(art, report):
    data = (art["dir"] / "b.png").read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_and_markdown(report):
    from rich.console import Console

    from ekdc.benchmark.report import bench_table, markdown_table

    console = Console(width=220, record=True)
    console.print(bench_table(report))
    text = console.export_text()
    for name in ("student.onnx", "student.int8.onnx", "teachers.onnx (reference)", "speedup", "onnxruntime"):
        assert name in text
    models = text.split("ekdc bench: speed")[0]
    # one line per model in the models table, with plain one-line column heads
    assert sum(1 for line in models.splitlines() if line.strip().startswith(("student", "teachers"))) == len(report["models"])
    assert "MACs" in models and "\nprecision\n" not in text
    md = markdown_table(report)
    assert md.count("\n") == 2 + len(report["models"]) and "`teachers.onnx (reference)`" in md


def test_no_reference_no_data(art):
    from rich.console import Console

    from ekdc.benchmark import bench

    console = Console(width=200, record=True)
    rep = bench(art["lonely"], console=console, batches=[2], runs=2, repeats=1, warmup=0, threads=1)
    out = console.export_text()
    assert "no reference" in out and "no accuracy" in out
    assert rep["reference"] is None and rep["speedup"] == {"2": None} and rep["memory_ratio"] is None
    [m] = rep["models"]
    assert m["accuracy"] is None and m["spread_pct"]["2"] is None
    assert all(v is None for v in m["vs_reference"]["speedup"].values())


@pytest.mark.parametrize("kwargs, word", [
    (dict(batches=[0, 4]), "positive"),
    (dict(batches=[]), "batch"),
    (dict(provider="tpu"), "provider"),
    (dict(runs=3, duration=1.0), "not both"),
    (dict(repeats=0), "repeats"),
    (dict(against="nowhere/teachers.onnx"), "not found"),
    (dict(data="nowhere.yaml"), "no such"),
    (dict(json_path="."), "folder"),
    (dict(duration=float("inf")), "finite"),
])
def test_bad_arguments(art, kwargs, word):
    from ekdc.benchmark import bench

    with pytest.raises(UserError) as e:
        bench([art["student"]], **kwargs)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_bad_models(art, tmp_path):
    from ekdc.onnx_graph import inspect_model

    text = tmp_path / "notes.onnx"
    text.write_text("hello, I am not a model\n")
    for path, word in ((tmp_path / "missing.onnx", "not found"), (art["garbage"], "not an ONNX file"),
                       (text, "not an ONNX file"), (art["wrong_input"], "expected [B,3,H,W]"), (tmp_path, "folder")):
        with pytest.raises(UserError) as e:
            inspect_model(path)
        assert word in str(e.value) and "\n" not in str(e.value), str(e.value)


# --------------------------------------------------------------------------------------------------
# the command line


def run_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "220", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "ekdc", "bench", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_cli_default_reference_and_data_from_metadata(art, tmp_path):
    """Only the model: the teachers beside it are the reference, its run folder gives the accuracy."""
    out_json = tmp_path / "r.json"
    r = run_cli(art["student"], "--batch", "1,2", "--runs", "2", "--repeats", "1", "--warmup", "0",
                "--threads", "1", "--json", out_json)
    assert r.returncode == 0, r.stderr
    assert "student.onnx" in r.stdout and "teachers.onnx" in r.stdout and "speedup" in r.stdout
    rep = json.loads(out_json.read_text())
    assert rep["reference"] == "teachers.onnx" and set(rep["speedup"]) == {"1", "2"}
    assert all(m["accuracy"] is not None for m in rep["models"])
    assert rep["data"]["source"] == str(art["run"])


def test_model_from_elsewhere(art, tmp_path):
    """Any ONNX image classifier benches; accuracy only once --classes and --preprocess say how to feed it."""
    import onnxruntime as ort

    from ekdc.benchmark import bench
    from ekdc.data import index_splits
    from ekdc.recipe import load_recipe

    common = dict(against=art["teachers"], batches=(1,), runs=2, repeats=1, warmup=0, threads=1, data=art["recipe"])
    rep = bench([art["foreign"]], **common)
    by = {m["name"]: m for m in rep["models"]}
    assert by["foreign.onnx"]["accuracy"] is None and by["teachers.onnx"]["accuracy"] is not None
    assert by["foreign.onnx"]["latency_ms"]["1"]["p50"] > 0 and by["foreign.onnx"]["macs"] == branch_macs(STUDENT_W)
    order = [f"class_{i}" for i in reversed(range(CLASSES))]  # the model's outputs, named in another order
    rep = bench([art["foreign"]], classes=order, preprocess="0.5,0.5,0.5/0.25,0.25,0.25", **common)
    got = next(m for m in rep["models"] if m["name"] == "foreign.onnx")["accuracy"]
    x, y = index_splits(load_recipe(art["recipe"]).data).take("val")
    logits = ort.InferenceSession(str(art["foreign"]), providers=["CPUExecutionProvider"]).run(
        None, {"x": ((x.float() / 255 - 0.5) / 0.25).numpy()})[0]
    assert got == pytest.approx(float((logits[:, ::-1].argmax(1) == y.numpy()).mean()))  # mapped by name
    with pytest.raises(UserError, match="lacks the data's class 'class_0'"):
        bench([art["foreign"]], classes=order[:-1] + ["other"], preprocess="raw", **common)
    with pytest.raises(UserError, match="go together"):
        bench([art["foreign"]], classes=order, **common)
    with pytest.raises(UserError, match="--json .* is the reference model"):  # the library guards it, not the CLI
        bench([art["foreign"]], json_path=art["teachers"], **common)
    # one name too many: every data class is named, but the columns would be read at the wrong places
    with pytest.raises(UserError, match=f"--classes names {CLASSES + 1} classes but foreign.onnx outputs {CLASSES}"):
        bench([art["foreign"]], classes=[*order, "extra"], preprocess="raw", **common)
    unfixed = tmp_path / "unfixed.onnx"  # the same model with its [B,C] output's C symbolic: run once to see C
    proto = onnx.load(str(art["foreign"]))
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    onnx.save(proto, str(unfixed))
    with pytest.raises(UserError, match=f"--classes names {CLASSES + 1} classes but unfixed.onnx outputs {CLASSES}"):
        bench([unfixed], classes=[*order, "extra"], preprocess="raw", **common)
    # on ekdc's own export the options are not used (its metadata says how to feed it), and it says so
    res = run_cli(art["student"], "--classes", ",".join(order), "--preprocess", "raw", "--data", art["recipe"],
                  "--batch", "1", "--runs", "2", "--repeats", "1", "--warmup", "0", "--threads", "1")
    assert res.returncode == 0 and "do not apply to student.onnx" in " ".join(res.stdout.split()), res.stdout


def test_the_current_folder_as_a_model_is_one_line(tmp_path):
    """'.' has no file name to put a default reference beside: said as the folder it is, before anything else."""
    for arg in (".", "./", ""):
        res = run_cli(arg, cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == \
            ["ekdc: error: model . is a folder, not a model file"], (arg, res.stderr)


def test_a_measuring_process_killed_without_a_word_points_at_the_batch(art, monkeypatch):
    """SIGKILL with no output is, on Linux, most often the out-of-memory killer: the line says to cut --batch."""
    import subprocess as sp

    import ekdc.benchmark.rounds as rounds
    from ekdc.benchmark import bench

    monkeypatch.setattr(rounds.subprocess, "run", lambda args, **k: sp.CompletedProcess(args, -9, "", ""))
    with pytest.raises(UserError, match=r"exit code -9\): no output; killed \(SIGKILL\), most often for memory: try a "
                                        r"smaller --batch than 64"):
        bench([art["student"]], against=art["teachers"], batches=(1, 64), runs=2, repeats=1, warmup=0, threads=1)


def test_an_ekdc_model_is_scored_by_its_class_names(art, tmp_path):
    """--data's classes are matched to the model's ekdc.classes by name: another order is read by name, and the
    same count of unrelated names is refused (an accuracy would compare unrelated labels)."""
    import onnxruntime as ort

    from ekdc.benchmark import bench
    from ekdc.data import index_splits
    from ekdc.recipe import load_recipe

    common = dict(against=art["teachers"], batches=(1,), runs=2, repeats=1, warmup=0, threads=1, data=art["recipe"])
    names = [f"class_{i}" for i in range(CLASSES)]
    renamed, unrelated = tmp_path / "renamed.onnx", tmp_path / "unrelated.onnx"
    for path, classes in ((renamed, names[::-1]), (unrelated, [f"digit_{i}" for i in range(CLASSES)])):
        m = onnx.load(str(art["student"]))
        next(p for p in m.metadata_props if p.key == "ekdc.classes").value = json.dumps(classes)
        onnx.save(m, str(path))
    x, y = index_splits(load_recipe(art["recipe"]).data).take("val")
    logits = ort.InferenceSession(str(art["student"]), providers=["CPUExecutionProvider"]).run(
        None, {"images": (x.float() / 255).numpy()})[0]
    rep = bench([renamed], **common)
    got = next(m for m in rep["models"] if m["name"] == "renamed.onnx")["accuracy"]
    assert got == pytest.approx(float((logits[:, ::-1].argmax(1) == y.numpy()).mean()))
    with pytest.raises(UserError, match=r"--data: .*class 'class_0' is not among unrelated.onnx's classes"):
        bench([unrelated], **common)


@pytest.mark.parametrize("case, word", [
    ("missing", "not found"),
    ("garbage", "not an ONNX file"),
    ("wrong_input", "expected [B,3,H,W]"),
    ("cuda", "CUDAExecutionProvider"),
    ("batch", "batch"),
    ("json_over_model", "is the input model 1"),
    ("plot_over_reference", "is the reference model"),
    ("json_is_plot", "are the same file"),
])
def test_cli_bad_input_one_line(art, case, word):
    import onnxruntime as ort

    if case == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    args = {
        "missing": [art["dir"] / "missing.onnx"],
        "garbage": [art["garbage"]],
        "wrong_input": [art["wrong_input"]],
        "cuda": [art["student"], "--provider", "cuda"],
        "batch": [art["student"], "--batch", "1,-4"],
        "json_over_model": [art["student"], "--json", art["student"]],
        "plot_over_reference": [art["student"], "--plot", art["teachers"]],  # the default reference, beside it
        "json_is_plot": [art["student"], "--json", art["dir"] / "r.out", "--plot", art["dir"] / "r.out"],
    }[case]
    before = {k: art[k].read_bytes() for k in ("student", "teachers")}
    r = run_cli(*args)
    assert before == {k: art[k].read_bytes() for k in ("student", "teachers")}  # nothing the user had is lost
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# --------------------------------------------------------------------------------------------------
# experiments/bench_cifar10_limited.py


def _bench_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_cifar10_limited.py"
    spec = importlib.util.spec_from_file_location("bench_cifar10_limited", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_needs_the_export(tmp_path, capsys):
    script = _bench_script()
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "student.onnx").write_bytes(b"")
    assert script.main(["--export", str(tmp_path / "export"), "--doc", str(tmp_path / "B.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student.fp16.onnx" in err[0] and "teachers.onnx" in err[0]
    assert not (tmp_path / "B.md").exists()


def test_bench_script_writes_doc(art, tmp_path, capsys):
    script = _bench_script()
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nAn earlier section someone wrote.\n")
    args = ["--export", str(art["student"].parent), "--doc", str(doc), "--json", str(tmp_path / "docs" / "b.json"),
            "--plot", str(tmp_path / "docs" / "b.png"), "--runs", "2", "--repeats", "1", "--threads", "1"]
    assert script.main(args) == 0, capsys.readouterr().err
    text = doc.read_text()
    assert "An earlier section someone wrote." in text  # other sections are kept
    assert f"--data {art['run']}" in text and "ekdc bench" in text and "onnxruntime" in text
    assert "`student.int8.onnx`" in text and "`teachers.onnx (reference)`" in text and "](b.png)" in text
    assert json.loads((tmp_path / "docs" / "b.json").read_text())["reference"] == "teachers.onnx"


def _gemm_classifier(path, classes: int):
    """images [B,3,64,64] -> Flatten -> Gemm: its weights are classes x 12,288 float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(classes)
    w = numpy_helper.from_array(rng.standard_normal((classes, 3 * 64 * 64)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    nodes = [helper.make_node("Flatten", ["images"], ["f"]), helper.make_node("Gemm", ["f", "W", "b"], ["logits"], transB=1)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, b]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_model_memory_reflects_the_weights(tmp_path):
    """Two models of known weight sizes (46.9 and 0.47 MiB): the graph's figures are exact, and the measured
    model memory, net of the runtime's fixed cost of a session, lies between the weights and twice the
    weights (ONNX Runtime holds the loaded file while it makes the session's copy) plus the activations and
    16 MiB of arena; the memory ratio follows the weights, not the runtime."""
    from ekdc.benchmark import bench

    big, small = _gemm_classifier(tmp_path / "big.onnx", 1000), _gemm_classifier(tmp_path / "small.onnx", 10)
    r = bench([small], against=big, batches=[1, 64], repeats=2, runs=10)
    by = {m["name"]: m for m in r["models"]}
    for name, classes in (("big.onnx", 1000), ("small.onnx", 10)):
        m = by[name]
        weights = (classes * 12288 + classes) * 4 / 2**20
        assert m["weights_mb"] == pytest.approx(weights)
        # at the Flatten node the input and its flat copy are alive at once: 2 x 64 x 12,288 floats
        assert m["activations_mb"]["64"] == pytest.approx(2 * 64 * 12288 * 4 / 2**20)
        assert weights * 0.9 <= m["model_mem_mb"] <= 2 * weights + m["activations_mb"]["64"] + 16, m
        by_batch = m["model_mem_by_batch_mb"]  # read after each batch size, smallest first: never shrinks
        # (within 1 MiB: the kernel syncs its resident-memory counters lazily)
        assert by_batch["1"] <= by_batch["64"] + 1 and by_batch["64"] <= m["model_mem_mb"] + 1 and by_batch["1"] >= weights * 0.9
    assert r["memory_ratio"] > 5  # the old figure, the runtime's own cost, gave about 1
    assert by["small.onnx"]["vs_reference"]["memory_ratio_by_batch"]["1"] > 5


def test_classes_from_a_file_saved_with_a_byte_order_mark():
    """Notepad saves UTF-8 with a byte-order mark: it is not part of the first class name."""
    import tempfile

    from ekdc.benchmark.valdata import parse_classes

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/classes.txt"
        with open(path, "w", encoding="utf-8-sig", newline="\r\n") as f:
            f.write("9\nmouette\n")
        assert parse_classes(f"@{path}") == ["9", "mouette"]
