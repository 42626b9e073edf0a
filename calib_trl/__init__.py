"""calib-trl: calibration-aware fine-tuning for TRL.

The user-facing surface: the trainers and their configs, knowledge detection, multiple-choice scoring and the
calibration report, temperature scaling, the training callback, and lm-evaluation-harness logs. Everything else lives
in its module (`calib_trl.metrics`, `calib_trl.knowledge`, `calib_trl.losses`, `calib_trl.defaults`, ...).
"""

__version__ = "0.1.0.dev0"

from .calib_sft_config import CalibSFTConfig
from .calib_sft_trainer import CalibSFTTrainer
from .calibration_config import CalibrationConfig
from .collator import DataCollatorWithKnowledgeFlags
from .evaluation.callbacks import CalibrationCallback
from .evaluation.lm_eval_logs import from_lm_eval, record_lm_eval
from .evaluation.scoring import MCQScores, score_multiple_choice
from .evaluation.temperature_scaling import apply_temperature, fit_temperature
from .knowledge import DetectionReport, OnlineKnowledgeDetector, detect_known
from .mcq import make_mcq_example
from .metrics import calibration_report
from .rcft_config import CalibRCFTConfig, RCFTConfig
from .rcft_trainer import RCFTTrainer

__all__ = [
    "CalibRCFTConfig",
    "CalibSFTConfig",
    "CalibSFTTrainer",
    "CalibrationCallback",
    "CalibrationConfig",
    "DataCollatorWithKnowledgeFlags",
    "DetectionReport",
    "MCQScores",
    "OnlineKnowledgeDetector",
    "RCFTConfig",
    "RCFTTrainer",
    "apply_temperature",
    "calibration_report",
    "detect_known",
    "fit_temperature",
    "from_lm_eval",
    "make_mcq_example",
    "record_lm_eval",
    "score_multiple_choice",
]
