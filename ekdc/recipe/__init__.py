"""Recipes: YAML read with ``yaml.safe_load``, validated by a typed pydantic schema.

Nothing in a recipe can import or run code: it is plain data, and every field has a type. Errors name
the key path (``distill.temperature: must be > 0``) and, for unknown keys, suggest the closest one.

    schema.py    the keys (each domain's own part comes from it: data, loss terms, architectures)
    loading.py   YAML, ``--set`` overrides, paths, dumping      messages.py  one-line errors
"""
from ..data.config import Augment, DataConfig
from .loading import (
                     apply_overrides,
                     dump_recipe,
                     load_recipe,
                     recipe_from_dict,
                     student_from_dict,
)
from .schema import (
                     IMAGENET_STEM_FROM_PX,
                     PLANNED_KEYS,
                     SAFE_NAME,
                     DistillConfig,
                     Recipe,
                     Schedule,
                     StudentConfig,
                     TeacherCacheConfig,
                     TeacherConfig,
)

__all__ = ["Augment", "DataConfig", "DistillConfig", "IMAGENET_STEM_FROM_PX", "PLANNED_KEYS", "Recipe", "SAFE_NAME",
           "Schedule", "StudentConfig", "TeacherCacheConfig", "TeacherConfig", "apply_overrides", "dump_recipe",
           "load_recipe", "recipe_from_dict", "student_from_dict"]
