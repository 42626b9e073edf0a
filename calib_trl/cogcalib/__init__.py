"""CogCalib (Wang et al., ACL 2025): knowledge detection and the calibration term on the examples the model knows."""

from .calib_sft_config import CalibSFTConfig
from .calib_sft_trainer import CalibSFTTrainer
from .detection import DetectionPlan
from .knowledge import DetectionReport, OnlineKnowledgeDetector, detect_known, style_adapt, youden_threshold
from .loss import CogCalibLoss

__all__ = [
    "CalibSFTConfig",
    "CalibSFTTrainer",
    "CogCalibLoss",
    "DetectionPlan",
    "DetectionReport",
    "OnlineKnowledgeDetector",
    "detect_known",
    "style_adapt",
    "youden_threshold",
]
