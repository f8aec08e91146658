from .distiller import Distiller, SupervisedClassifier
from .pipeline import distill, predict
from .trainer import TrainingDiverged

__all__ = ["Distiller", "SupervisedClassifier", "TrainingDiverged", "distill", "predict"]
