from .losses import LOSS_TERMS, EKDLoss, kd_kl
from .trainer import TrainingDiverged, distill, load_teacher, predict

__all__ = ["EKDLoss", "LOSS_TERMS", "TrainingDiverged", "distill", "kd_kl", "load_teacher", "predict"]
