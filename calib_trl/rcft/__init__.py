"""CFT and RCFT (Xiao et al., ICML 2025): calibration-aware fine-tuning with an EM-style ECE regulariser."""

from .loss import RCFTLoss
from .rcft_config import CalibRCFTConfig, RCFTConfig
from .rcft_trainer import RCFTTrainer

__all__ = ["CalibRCFTConfig", "RCFTConfig", "RCFTLoss", "RCFTTrainer"]
