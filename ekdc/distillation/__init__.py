from .distiller import Distiller, SupervisedClassifier
from .losses import LOSS_TERMS, EKDLoss, kd_kl
from .pipeline import distill, predict
from .trainer import TrainingDiverged

__all__ = ["Distiller", "EKDLoss", "LOSS_TERMS", "SupervisedClassifier", "TrainingDiverged", "distill", "kd_kl",
           "predict"]
