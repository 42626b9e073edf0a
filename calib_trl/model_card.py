"""Model cards that state calibration: tags, both papers' citations, and calibration results as model-index entries.

TRL writes `README.md` into the output directory at every checkpoint save (`create_model_card`). The trainers add,
on the main process only and without any extra computation:

- the `calib-trl` tag and the method's tag (`cogcalib` / `rcft`), through `_tag_names`;
- a "Calibration" section: the method and its settings, a table of the recorded calibration results (accuracy, ECE,
  class-wise ECE, Brier, ...) per dataset and split, the reliability diagram when one was saved;
- the same results as `model-index` entries (`eval_results` in the card metadata), so the Hub shows them;
- both papers' BibTeX in the citations.

Results are recorded with `trainer.record_calibration(report, dataset_name, split)` (the `CalibrationCallback` and the
examples do it).
"""

from __future__ import annotations

import os
import textwrap

from huggingface_hub import EvalResult, ModelCard

COGCALIB_CITATION = textwrap.dedent("""\
    @inproceedings{wang2025objective,
        title        = {{Towards Objective Fine-tuning: How LLMs' Prior Knowledge Causes Potential Poor Calibration?}},
        author       = {Ziming Wang and Zeyu Shi and Haoyi Zhou and Shiqi Gao and Qingyun Sun and Jianxin Li},
        year         = 2025,
        booktitle    = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics (ACL 2025)},
        eprint       = {arXiv:2505.20903}
    }""")

RCFT_CITATION = textwrap.dedent("""\
    @inproceedings{xiao2025restoring,
        title        = {{Restoring Calibration for Aligned Large Language Models: A Calibration-Aware Fine-Tuning Approach}},
        author       = {Jiancong Xiao and Bojian Hou and Zhanliang Wang and Ruochen Jin and Qi Long and Weijie J. Su and Li Shen},
        year         = 2025,
        booktitle    = {Proceedings of the 42nd International Conference on Machine Learning (ICML 2025)},
        eprint       = {arXiv:2505.01997}
    }""")

# Metrics shown in the card, in order: (report key, display name, model-index metric type)
CARD_METRICS = (
    ("accuracy", "Accuracy", "accuracy"),
    ("ece", "ECE", "ece"),
    ("cw_ece", "Class-wise ECE", "classwise_ece"),
    ("brier", "Brier", "brier"),
    ("nll", "NLL", "nll"),
    ("mean_confidence", "Mean confidence", "mean_confidence"),
)


def calibration_section(method: str, settings: dict, results: list[dict]) -> str:
    lines = ["## Calibration", "", f"Trained with calib-trl ({method}).", ""]
    if settings:
        lines.append("Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()) + ".")
        lines.append("")
    if results:
        header = "| Dataset | Split | Step | " + " | ".join(name for _, name, _ in CARD_METRICS) + " |"
        lines += [header, "|" + "---|" * (3 + len(CARD_METRICS))]
        for r in results:
            values = " | ".join(_fmt(r["report"].get(key)) for key, _, _ in CARD_METRICS)
            lines.append(f"| {r['dataset']} | {r['split']} | {r.get('step', '')} | {values} |")
        lines.append("")
        lines.append(
            "ECE: 10 equal-width bins on the top option probability; class-wise ECE averages the same over "
            "each option's probability."
        )
        lines.append("")
        for r in results:
            if r.get("diagram"):
                lines.append(f"![Reliability diagram, {r['dataset']} {r['split']}]({r['diagram']})")
                lines.append("")
    else:
        lines.append("No calibration results were recorded for this checkpoint.")
        lines.append("")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


class CalibrationModelCardMixin:
    """Adds calibration results and the calibration section to the card TRL writes."""

    def record_calibration(self, report: dict, dataset_name: str, split: str, diagram: str | None = None) -> None:
        """
        Record a calibration report (`calib_trl.metrics.calibration_report`) for the model card. A later report for
        the same dataset and split replaces the earlier one. `diagram` is a PNG path (made relative to `output_dir`).
        """
        if not hasattr(self, "_calibration_results"):
            self._calibration_results = {}
        if diagram is not None:
            try:  # relative to the card, which lives in `output_dir`
                diagram = os.path.relpath(os.path.abspath(diagram), os.path.abspath(self.args.output_dir))
            except ValueError:  # another drive (Windows)
                diagram = os.path.abspath(diagram)
        step = getattr(getattr(self, "state", None), "global_step", None)
        self._calibration_results[(dataset_name, split)] = {
            "dataset": dataset_name,
            "split": split,
            "step": step,
            "report": dict(report),
            "diagram": diagram,
        }

    @property
    def calibration_results(self) -> list[dict]:
        return list(getattr(self, "_calibration_results", {}).values())

    def _card_settings(self) -> dict:
        return {}

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        card = ModelCard.load(path)
        results = self.calibration_results
        if results:
            card.data.model_name = card.data.model_name or model_name or os.path.basename(self.args.output_dir)
            card.data.eval_results = [
                EvalResult(
                    task_type="multiple-choice",
                    task_name="Multiple-choice calibration",
                    dataset_type=r["dataset"],
                    dataset_name=r["dataset"],
                    dataset_split=r["split"],
                    metric_type=metric_type,
                    metric_name=name,
                    metric_value=float(r["report"][key]),
                )
                for r in results
                for key, name, metric_type in CARD_METRICS
                if r["report"].get(key) is not None
            ]
        section = calibration_section(self._name, self._card_settings(), results)
        text = card.text
        marker = "## Training procedure"
        card.text = text.replace(marker, section + "\n" + marker, 1) if marker in text else text + "\n" + section
        card.save(path)
