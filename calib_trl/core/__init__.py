"""What every calibration method plugs into: the trainer that holds the methods' parts, their interface, column
carrying and answer location, the forward capture, the collator, the saved state and the model card."""

from .collator import DataCollatorWithKnowledgeFlags
from .config import CalibrationConfig
from .part import CalibrationPart, LossStep
from .trainer import CalibrationTrainer

__all__ = ["CalibrationConfig", "CalibrationPart", "CalibrationTrainer", "DataCollatorWithKnowledgeFlags", "LossStep"]
