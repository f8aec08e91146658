"""ekdc: Ensemble Knowledge Distillation, from recipe to deployable model.

    from ekdc import load_recipe, distill, fold, export, bench
    run = distill(load_recipe("recipes/quickstart.yaml"))
"""
from .errors import UserError
from .recipe import Recipe, load_recipe
from .run import RunDir

__version__ = "0.1.0"


def __getattr__(name: str):
    # heavy submodules (torch, onnx) load on first use, so `ekdc --help` stays fast
    if name == "distill":
        from .distillation import distill

        return distill
    if name == "fold":
        from .deploy.fold import fold

        return fold
    if name == "export":
        from .deploy.export import export

        return export
    if name == "bench":
        from .benchmark import bench

        return bench
    if name in ("create_model", "list_models", "register_model"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'ekdc' has no attribute {name!r}")


__all__ = ["Recipe", "RunDir", "UserError", "bench", "create_model", "distill", "export", "fold", "list_models",
           "load_recipe", "register_model"]
