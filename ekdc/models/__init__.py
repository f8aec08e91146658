"""Model registry and families. Importing this package registers every model."""
from . import fastnet, fastnet_student, resnet_cifar, student, tv_small, vgg, wrn  # noqa: F401  (registration side effects)
from ._registry import (
    FoldableStudent,
    PlanSpace,
    StudentFamily,
    check_model_name,
    check_student,
    create_model,
    get_student,
    list_models,
    list_students,
    register_model,
    register_student,
    widths_between,
)
from .layers import FeatureClassifier
from .profile import count_macs, count_params
from .student import BranchOutputs, EKDStudent

__all__ = [
    "BranchOutputs",
    "EKDStudent",
    "FeatureClassifier",
    "FoldableStudent",
    "PlanSpace",
    "StudentFamily",
    "check_model_name",
    "check_student",
    "count_macs",
    "count_params",
    "create_model",
    "get_student",
    "list_students",
    "register_student",
    "list_models",
    "register_model",
    "widths_between",
]
