from pathlib import Path

import pytest
import yaml

from ekdc import UserError, load_recipe
from ekdc.recipe import dump_recipe, recipe_from_dict
from tests.conftest import ROOT, tiny_recipe, write_recipe


def _error(tmp_path: Path, text: str, overrides=None) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_recipe(p, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _yaml(**over) -> str:
    return yaml.safe_dump(tiny_recipe(**over))


def test_shipped_recipes_validate():
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        r = load_recipe(p)
        # ekd pairs branch i with teacher i; the other modes may use any branch count
        # (cifar10-strong ships a one-branch student, docs/EVIDENCE.md)
        if r.mode == "ekd":
            assert r.student.num_branches == len(r.teachers), p.name


def test_defaults_and_round_trip(tmp_path):
    r = load_recipe(write_recipe(tmp_path / "r.yaml"))
    assert r.student.num_branches == 2 and r.mode == "ekd"
    assert [t.name for t in r.teachers] == ["resnet8", "wrn_16_2"]
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)))
    assert again == r


def test_unknown_key_suggests_closest(tmp_path):
    raw = tiny_recipe()
    raw["distill"]["temprature"] = 3
    msg = _error(tmp_path, yaml.safe_dump(raw))
    assert "distill.temprature" in msg and "did you mean 'temperature'" in msg


@pytest.mark.parametrize("where, key, path, hint", [
    ((), "Seed", "Seed", "seed"),
    (("data",), "Root", "data.Root", "root"),
    (("data", "augment"), "Hflip", "data.augment.Hflip", "hflip"),  # inside a union (Augment | bool)
])
def test_capitalised_unknown_key_is_named(tmp_path, where, key, path, hint):
    raw = tiny_recipe()
    node = raw
    for part in where:
        node = node.setdefault(part, {}) if part != "augment" else node.setdefault(part, {"hflip": True})
    node[key] = 1
    msg = _error(tmp_path, yaml.safe_dump(raw))
    assert f"unknown key '{path}' (did you mean '{hint}'?)" in msg


def test_wrong_type_names_path(tmp_path):
    msg = _error(tmp_path, _yaml(distill={"epochs": "many"}))
    assert msg.split(": ", 1)[1].startswith("distill.epochs")


@pytest.mark.parametrize("over, path, words", [
    ({"distill": {"temperature": 0}}, "distill.temperature", "> 0"),
    ({"distill": {"epochs": -1}}, "distill.epochs", ">= 1"),
    ({"student": {"num_branches": 0}}, "student.num_branches", ">= 1"),
    ({"data": {"dataset": "mnist"}}, "data.dataset", "unknown data set 'mnist'"),
    ({"seed": 10**29}, "seed", "<= 4294967295"),
    ({"name": ".."}, "name", "not '.' or '..'"),
    ({"data": {"std": [0.2, float("inf"), 0.2]}}, "data.std", "finite"),
    ({"data": {"augment": {"crop_padding": 100000}}}, "data", "larger than the image"),
    ({"data": {"augment": {"cutout": 33}}}, "data", "augment.cutout 33 is larger than the image"),
    ({"data": {"augment": {"cutout": -1}}}, "data.augment.cutout", ">= 0"),
])
def test_out_of_range(tmp_path, over, path, words):
    msg = _error(tmp_path, _yaml(**over))
    assert path in msg and words in msg


@pytest.mark.parametrize("item, path", [
    ("distill.epochs=true", "distill.epochs: must be a number, not true"),  # pydantic's lax mode read it as 1
    ("distill.lr=false", "distill.lr: must be a number, not false"),
    ("data.per_class=true", "data.per_class: must be a number, not true"),  # Optional[int]
    ("student.branch_widths=[32, true]", "student.branch_widths: item 1: must be a number, not true"),
    ("distill.weights.kd=true", "distill.weights: kd: must be a number, not true"),
    ("distill.kd.beta=true", "distill.kd.beta: must be a number, not true"),  # a loss term's own settings
    ("data.mean=[0.5, true, 0.5]", "data.mean: item 1: must be a number, not true"),  # Optional[list[float]]
    ("channels_last=1", "channels_last: must be true or false, not 1"),  # and the other way round
    ("data.augment.hflip=0", "data.augment.hflip: must be true or false, not 0"),
])
def test_bool_and_number_are_not_mixed_up(tmp_path, item, path):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(tmp_path / "r.yaml"), [item])
    assert path in str(err.value)


def test_a_plugins_strict_settings_refuse_bools_for_numbers_in_any_spelling():
    from typing import Annotated, Literal, Optional, Union

    from pydantic import Field, ValidationError

    from ekdc import StrictSettings

    class Mine(StrictSettings):
        a: int | None = None
        b: tuple[float, float] = (0.0, 1.0)
        c: list[Annotated[int, Field(ge=1)]] = [1]
        d: Optional[dict[str, float]] = None
        e: Union[int, Literal["auto"]] = "auto"
        f: Union[bool, str] = False  # a bool is one of its types: kept
        g: bool = True
        h: Union[int, bool] = 0  # either: kept

    for key, value, words in [("a", True, "must be a number, not true"), ("b", (0.5, False), "item 1:"),
                              ("c", [2, True], "item 1:"), ("d", {"x": True}, "x: must be a number"),
                              ("e", True, "must be a number, not true"), ("g", 0, "must be true or false, not 0")]:
        with pytest.raises(ValidationError, match=words):
            Mine(**{key: value})
    assert Mine(f=True).f is True and Mine(a=3, b=(1, 2), e=4).b == (1.0, 2.0)
    assert Mine(h=1).h == 1 and Mine(h=True).h is True


def test_numbers_and_bools_still_read(tmp_path):
    r = load_recipe(write_recipe(tmp_path / "r.yaml"), ["distill.epochs=3.0", "data.augment=true", "distill.lr=1"])
    assert r.distill.epochs == 3 and r.data.augment is True and r.distill.lr == 1.0


def test_branch_count_must_match_teachers(tmp_path):
    msg = _error(tmp_path, _yaml(student={"num_branches": 3}))
    assert "num_branches is 3" in msg and "2 teachers" in msg


def test_unknown_architecture(tmp_path):
    raw = tiny_recipe()
    raw["teachers"][0]["arch"] = "resnet21"
    msg = _error(tmp_path, yaml.safe_dump(raw))
    assert "teachers.0.arch" in msg and "resnet21" in msg and "did you mean" in msg


def test_missing_not_yaml_not_mapping(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    assert "not valid YAML" in _error(tmp_path, "a: [1, 2\nb: }")
    assert "must be a YAML mapping" in _error(tmp_path, "- just\n- a list\n")


def test_yaml_cannot_run_code(tmp_path):
    msg = _error(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    assert "not valid YAML" in msg


def test_a_key_given_twice_is_refused_not_the_last_kept(tmp_path):
    """YAML keeps the last of two equal keys without a word: a recipe's 'mode: ekd' ... 'mode: ce' would
    train ce. ekdc refuses it, naming both lines; an anchor merged in ('<<: *base') may still be overridden."""
    msg = _error(tmp_path, "name: x\nmode: ekd\nseed: 1\nmode: ce\n")
    assert "line 4" in msg and "key 'mode' is given twice (first on line 2)" in msg, msg
    assert "key 'epochs' is given twice" in _error(tmp_path, "distill: {epochs: 2, epochs: 3}\n")
    from ekdc.recipe.loading import load_yaml

    assert load_yaml("a: &d {x: 1, y: 2}\nb:\n  <<: *d\n  x: 3\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_set_overrides(tmp_path):
    p = write_recipe(tmp_path / "r.yaml")
    r = load_recipe(p, ["mode=avg_kd", "distill.temperature=2.5", "teachers.0.arch=resnet20",
                        "data.augment=false", "student.branch_widths=[4, 8]"])
    assert r.mode == "avg_kd" and r.distill.temperature == 2.5 and r.teachers[0].arch == "resnet20"
    assert r.data.augment is False and r.student.branch_widths == [4, 8]


@pytest.mark.parametrize("item, words", [
    ("distill.temprature=3", "unknown key 'distill.temprature' (did you mean 'temperature'?)"),
    ("teachers.5.arch=resnet20", "not an index"),
    ("nokey", "expected key.path=value"),
    ("mode=teach", "mode"),
])
def test_bad_set(tmp_path, item, words):
    p = write_recipe(tmp_path / "r.yaml")
    with pytest.raises(UserError) as e:
        load_recipe(p, [item])
    assert words in str(e.value)


def test_set_inside_a_value_that_holds_no_keys_says_so(tmp_path):
    """augment: false is a value, not a mapping: a key set inside it is refused in one line that shows how to
    replace it whole (it was a TypeError traceback), and so is a path through it."""
    p = write_recipe(tmp_path / "r.yaml", data={"augment": False})
    with pytest.raises(UserError) as e:
        load_recipe(p, ["data.augment.cutout=3"])
    assert str(e.value) == ("--set data.augment.cutout=3: 'data.augment' is false, not a mapping; replace it whole "
                            "(its other keys then take their defaults): --set 'data.augment={cutout: 3}'")
    assert load_recipe(p, ["data.augment={cutout: 3}"]).data.augment.cutout == 3  # and the way it shows works
    with pytest.raises(UserError) as e:  # a list value, as typed: the line it shows is a valid --set
        load_recipe(p, ["data.augment.scale=[0.5, 1.0]"])
    shown = str(e.value).split("--set '", 1)[1].rstrip("'")
    assert load_recipe(p, [shown]).data.augment.scale == [0.5, 1.0]
    with pytest.raises(UserError, match=r"did you mean 'cutout'"):  # a typo is caught first
        load_recipe(p, ["data.augment.cutot=3"])
    with pytest.raises(UserError, match=r"^--set seed.x=1: 'seed' holds a value \(0\), not keys$"):
        load_recipe(p, ["seed.x=1"])  # a field that is never a mapping: no replacement to offer
    with pytest.raises(UserError, match="'data.augment' is false, not a mapping"):
        load_recipe(p, ["data.augment.scale.0=0.5"])


def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch):
    """A run folder's recipe.yaml must work from any directory (export, bench, --resume)."""
    (tmp_path / "work" / "data").mkdir(parents=True)
    (tmp_path / "work" / "t.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "work")
    raw = tiny_recipe(data={"dataset": "imagefolder", "root": "data"})
    raw["teachers"][0]["checkpoint"] = "t.pt"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    r = load_recipe(tmp_path / "r.yaml")
    assert r.data.root == str(tmp_path / "work" / "data")
    assert r.teachers[0].weights == str(tmp_path / "work" / "t.pt") and r.teachers[0].train is None  # checkpoint: is the old name
    saved = tmp_path / "run" / "recipe.yaml"
    saved.parent.mkdir()
    saved.write_text(dump_recipe(r))
    monkeypatch.chdir(tmp_path)
    assert load_recipe(saved) == r


def test_student_stem_defaults_by_image_size(tmp_path):
    small = load_recipe(write_recipe(tmp_path / "a.yaml", data={"image_size": 32}))
    large = load_recipe(write_recipe(tmp_path / "b.yaml", data={"image_size": 128}))
    assert (small.student.stem, large.student.stem) == ("cifar", "imagenet")
    assert load_recipe(tmp_path / "b.yaml", ["student.stem=cifar"]).student.stem == "cifar"  # given, kept
    msg = _error(tmp_path, _yaml(student={"block": "mobile"}))
    assert "student.block" in msg and "inverted_residual" in msg


def test_the_readme_shows_the_shipped_headline_recipe():
    """The README's one recipe is recipes/cifar10-strong.yaml as shipped (its keys, not its comments)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```yaml\nname: cifar10-strong", 1)[1].split("```", 1)[0]
    shipped = yaml.safe_load((ROOT / "recipes" / "cifar10-strong.yaml").read_text())
    assert yaml.safe_load("name: cifar10-strong" + block) == shipped


def test_library_conveniences_a_new_user_tries(tmp_path):
    """dir(ekdc) lists the lazily loaded API; one override may be given bare; an empty recipe says so."""
    import ekdc

    assert {"load_recipe", "distill", "export", "bench"} <= set(dir(ekdc))
    assert ekdc.load_recipe(ROOT / "recipes" / "quickstart.yaml", "distill.epochs=2").distill.epochs == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ekdc.UserError, match="the recipe is empty"):
        ekdc.load_recipe(empty)
