"""calib-trl: calibration-aware fine-tuning for TRL."""

__version__ = "0.1.0.dev0"
