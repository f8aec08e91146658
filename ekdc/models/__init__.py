"""Model registry and families. Importing this package registers every model."""
from . import resnet_cifar, student, tv_small, vgg, wrn  # noqa: F401  (registration side effects)
from ._registry import check_model_name, create_model, list_models, register_model
from .layers import FeatureClassifier
from .profile import count_macs, count_params
from .student import BranchOutputs, EKDStudent

__all__ = [
    "BranchOutputs",
    "EKDStudent",
    "FeatureClassifier",
    "check_model_name",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "register_model",
]
