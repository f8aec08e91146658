from ..training.trainer import TrainingDiverged
from .distiller import Distiller, SupervisedClassifier
from .pipeline import distill, predict

__all__ = ["Distiller", "SupervisedClassifier", "TrainingDiverged", "distill", "predict"]
