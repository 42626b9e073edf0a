"""calib-trl: calibration-aware fine-tuning for TRL."""

__version__ = "0.1.0.dev0"

from .calib_sft_config import CalibSFTConfig
from .calib_sft_trainer import CalibSFTTrainer
from .callbacks import CalibrationCallback
from .collator import DataCollatorWithKnowledgeFlags
from .knowledge import DetectionReport, OnlineKnowledgeDetector, detect_known, style_adapt, youden_threshold
from .lm_eval_logs import from_lm_eval, record_lm_eval
from .losses import rcft_target
from .mcq import make_mcq_example
from .metrics import calibration_report
from .rcft_config import RCFTConfig
from .rcft_trainer import RCFTTrainer
from .scoring import score_multiple_choice

__all__ = [
    "CalibSFTConfig",
    "CalibSFTTrainer",
    "CalibrationCallback",
    "DataCollatorWithKnowledgeFlags",
    "DetectionReport",
    "OnlineKnowledgeDetector",
    "RCFTConfig",
    "RCFTTrainer",
    "calibration_report",
    "detect_known",
    "from_lm_eval",
    "make_mcq_example",
    "rcft_target",
    "record_lm_eval",
    "score_multiple_choice",
    "style_adapt",
    "youden_threshold",
]
