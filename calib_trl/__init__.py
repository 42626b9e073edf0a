"""calib-trl: calibration-aware fine-tuning for TRL.

The user-facing surface: the trainers and their configs, knowledge detection, the scoring of multiple-choice and
generated answers and their calibration report, temperature scaling, the training callback, and lm-evaluation-harness
logs. The package holds one folder per method (`calib_trl.cogcalib`, `calib_trl.rcft`), the core they plug into
(`calib_trl.core`), the evaluation (`calib_trl.evaluation`) and the embedded defaults (`calib_trl.defaults`); the
shared math is in `calib_trl.losses` and `calib_trl.metrics`.
"""

__version__ = "0.1.0.dev0"

from .cogcalib import CalibSFTConfig, CalibSFTTrainer, DetectionReport, OnlineKnowledgeDetector, detect_known
from .core import CalibrationConfig, CalibrationTrainer, DataCollatorWithKnowledgeFlags
from .evaluation import (
    CalibrationCallback,
    GenerationScores,
    MCQScores,
    apply_temperature,
    evaluate_calibration,
    fit_temperature,
    from_lm_eval,
    record_lm_eval,
    score_generations,
    score_multiple_choice,
)
from .mcq import make_mcq_example
from .metrics import calibration_report, confidence_report
from .rcft import CalibRCFTConfig, RCFTConfig, RCFTTrainer

__all__ = [
    "CalibRCFTConfig",
    "CalibSFTConfig",
    "CalibSFTTrainer",
    "CalibrationCallback",
    "CalibrationConfig",
    "CalibrationTrainer",
    "DataCollatorWithKnowledgeFlags",
    "DetectionReport",
    "GenerationScores",
    "MCQScores",
    "OnlineKnowledgeDetector",
    "RCFTConfig",
    "RCFTTrainer",
    "apply_temperature",
    "calibration_report",
    "confidence_report",
    "detect_known",
    "evaluate_calibration",
    "fit_temperature",
    "from_lm_eval",
    "make_mcq_example",
    "record_lm_eval",
    "score_generations",
    "score_multiple_choice",
]
