"""ekdc: Ensemble Knowledge Distillation, from recipe to deployable model.

    from ekdc import load_recipe, distill, fold, export, bench, plan_student, compare
    run = distill(load_recipe("recipes/quickstart.yaml"))
"""
from .errors import UserError

__version__ = "0.1.0"

# every public name but UserError loads on first use: `ekdc --help` stays fast, and the bench's measuring
# process (python -m ekdc.benchmark._worker) imports no torch, pydantic or onnx through this package
_LAZY = {
    "Recipe": ("recipe", "Recipe"), "load_recipe": ("recipe", "load_recipe"), "RunDir": ("run", "RunDir"),
    "distill": ("distillation", "distill"), "fold": ("deploy.fold", "fold"), "export": ("deploy.export", "export"),
    "bench": ("benchmark", "bench"), "create_model": ("models", "create_model"),
    "list_models": ("models", "list_models"), "register_model": ("models", "register_model"),
    "plan_student": ("plan", "plan_student"), "Plan": ("plan", "Plan"),
    "compare": ("comparison", "compare"), "export_formats": ("formats", "export_formats"),
    "list_datasets": ("data", "list_datasets"), "register_dataset": ("data", "register_dataset"),
    "list_terms": ("losses", "list_terms"), "register_term": ("losses", "register_term"),
    "StrictSettings": ("settings", "StrictSettings"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'ekdc' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too: help(ekdc), dir() and tab completion list them
    return sorted({*globals(), *_LAZY})


__all__ = ["Plan", "Recipe", "RunDir", "StrictSettings", "UserError", "bench", "compare", "create_model", "distill", "export",
           "export_formats", "fold", "list_datasets", "list_models", "list_terms", "load_recipe", "plan_student",
           "register_dataset", "register_model", "register_term"]
