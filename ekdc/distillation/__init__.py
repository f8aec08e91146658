from .distiller import Distiller, SupervisedClassifier
from .pipeline import distill, predict
from ..training.trainer import TrainingDiverged

__all__ = ["Distiller", "SupervisedClassifier", "TrainingDiverged", "distill", "predict"]
