"""The public names: ``from ekdc import X`` gives the function or class, before and after any subpackage is
imported (a subpackage named like a function would shadow it once imported)."""
import subprocess
import sys

from conftest import ROOT

PROBE = r"""
import importlib, pkgutil, types
import ekdc
first = {n: getattr(ekdc, n) for n in ekdc.__all__}
for m in pkgutil.walk_packages(ekdc.__path__, "ekdc."):
    if m.ispkg:
        importlib.import_module(m.name)  # what any later import of ekdc's own code does to the namespace
for n in ekdc.__all__:
    exec(f"from ekdc import {n} as value")
    assert not isinstance(value, types.ModuleType), f"ekdc.{n} is the module {value.__name__}"
    assert value is first[n], n
print("ok", len(ekdc.__all__))
"""


def test_every_public_name_is_what_it_says_after_every_subpackage_is_imported():
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-2000:]


def test_every_public_name_is_documented():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    api = text.split("## The Python API", 1)[1].split("\n## ", 1)[0]
    import ekdc

    missing = [n for n in ekdc.__all__ if f"`{n}" not in api and f" {n}`" not in api and f"`{n}`" not in api]
    assert not missing, missing
