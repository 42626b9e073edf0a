"""Measuring calibration: the scoring of multiple-choice and generated answers, the reports and their tables, reliability
diagrams, temperature scaling, the training callback and lm-evaluation-harness logs."""

from .callbacks import CalibrationCallback
from .evaluate import Evaluation, evaluate_calibration, fit_temperature_on
from .generation import GenerationScores, match_answer, score_generations
from .lm_eval_logs import from_lm_eval, record_lm_eval
from .scoring import MCQScores, score_multiple_choice
from .temperature_scaling import apply_temperature, fit_temperature

__all__ = [
    "CalibrationCallback",
    "Evaluation",
    "GenerationScores",
    "MCQScores",
    "apply_temperature",
    "evaluate_calibration",
    "fit_temperature",
    "fit_temperature_on",
    "from_lm_eval",
    "match_answer",
    "record_lm_eval",
    "score_generations",
    "score_multiple_choice",
]
