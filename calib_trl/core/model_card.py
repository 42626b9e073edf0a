"""Model cards that state calibration: tags, both papers' citations, and calibration results as model-index entries.

The trainers write `README.md` wherever TRL writes its card (every checkpoint save, `push_to_hub`, through
`create_model_card`) and also on every `trainer.save_model()` call, in `output_dir` and, when `save_model` is given
another directory, there too. Only the main process writes. The card is rendered from calib-trl's template
(`templates/model_card.md`, TRL's language-model card with a calibration section) through
`huggingface_hub.ModelCard.from_template`, the call TRL's own `generate_model_card` makes; TRL's `_template_file` hook
resolves names inside the `trl` package only, so it cannot point at a template of another package. The card holds:

- its name (`hub_model_id`, else the output directory's name, as TRL names checkpoint cards) and its base model: the Hub
  id the model was loaded from, else the one its config records (`calib_trl_base_model`). A local base model with no
  known Hub origin is named without a link, and the quick-start loads the model from `hub_model_id` or the directory
  of the card;
- TRL's tags plus `calib-trl` and the method's tag (`cogcalib` / `rcft`);
- a "Calibration" section: the method and its settings, a table of the recorded calibration results per dataset and
  split, the base model's beside the fine-tuned model's, the reliability diagrams that were saved;
- the fine-tuned model's results as `model-index` entries (`eval_results` in the card metadata), so the Hub shows them;
- both papers' BibTeX in the citations.

Every name that comes from a user's data or files (model, dataset, split, task, settings) is escaped for markdown and
HTML (`calib_trl.reports.escape_markdown`); the metadata is YAML, which `huggingface_hub` quotes.

Results are recorded with `trainer.record_calibration(report, dataset_name, split, base=...)` (the
`CalibrationCallback` and the examples do it). Datasets that calib-trl knows by name (the embedded ones) register how a
card names them with `register_dataset`.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..evaluation.reports import REPORT_METRICS, escape_markdown, format_table

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

COGCALIB_PAPER = {
    "title": "Towards Objective Fine-tuning: How LLMs' Prior Knowledge Causes Potential Poor Calibration?",
    "id": "2505.20903",
    "citation": COGCALIB_CITATION + "\n\n" + RCFT_CITATION,
}
RCFT_PAPER = {
    "title": "Restoring Calibration for Aligned Large Language Models: A Calibration-Aware Fine-Tuning Approach",
    "id": "2505.01997",
    "citation": RCFT_CITATION + "\n\n" + COGCALIB_CITATION,
}
"""The trainers' `_paper` (TRL's convention): the method's paper first, both papers' BibTeX in the card."""

BASE_MODEL_CONFIG_KEY = "calib_trl_base_model"
"""Config attribute naming the Hub model a local checkpoint descends from (kept by `from_pretrained`/`save_pretrained`)."""

# A Hub repository id (`name` or `owner/name`); anything else is not linked to the Hub
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# Datasets calib-trl knows by name: {name: {"hub_id", "display_name", "config", "note"}} (see `register_dataset`)
_DATASETS: dict[str, dict] = {}


def register_dataset(
    name: str, hub_id: str | None, display_name: str, config: str | None = None, note: str | None = None
) -> None:
    """
    How model cards name a dataset that calib-trl knows by `name` (the embedded datasets register themselves): the Hub
    dataset it comes from (`None` for a generated one), its display name and configuration, and a note the card's
    calibration section prints under the table.
    """
    _DATASETS[name] = {"hub_id": hub_id, "display_name": display_name, "config": config, "note": note}


def _is_hub_id(name) -> bool:
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


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
    """The Hub id of a dataset as calib-trl names it: a registered name's, a Hub id itself; a local path has none."""
    if name in _DATASETS:
        return _DATASETS[name]["hub_id"]
    return name if _is_hub_id(name) else None


def dataset_fields(name: str) -> dict:
    """The `EvalResult` dataset fields of a dataset as calib-trl names it (registered, a Hub id, or a local path)."""
    if name in _DATASETS:
        known = _DATASETS[name]
        fields = {"dataset_type": known["hub_id"] or name, "dataset_name": known["display_name"]}
        return {**fields, "dataset_config": known["config"]} if known["config"] else fields
    if os.path.exists(name):
        name = os.path.basename(os.path.normpath(name))
    return {"dataset_type": name, "dataset_name": name}


def _hub_link(hub_id: str, kind: str = "") -> str:
    return f"[{escape_markdown(hub_id)}](https://huggingface.co/{kind}{quote(hub_id)})"


def calibration_section(method: str, settings: dict, results: list[dict], directory: str = ".") -> str:
    """
    The card's "Calibration" section. `results` are `record_calibration`'s records; diagram links are made relative
    to `directory`, where the card is written.
    """
    lines = ["## Calibration", "", f"Trained with calib-trl ({escape_markdown(method)}).", ""]
    if settings:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {escape_markdown(k)} | {escape_markdown(v)} |" for k, v in settings.items()]
        lines += [""]
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
        "`base` is the model before fine-tuning, `fine-tuned` this model; `n` is the number of rows. "
        f"ECE: equal-width bins on the confidence{binning} (multiple choice: the top option probability; generated "
        "answers: the answer's confidence against its match with the reference); `cw_ece` (class-wise ECE) averages "
        "the same over each option's probability.",
        "",
    ]
    for name in dict.fromkeys(r["dataset"] for r in results):
        note = _DATASETS.get(name, {}).get("note")
        if note:
            lines += [note, ""]
    for label, r in zip(rows, ordered):
        if r.get("diagram"):
            try:  # relative to the card
                link = Path(os.path.relpath(r["diagram"], os.path.abspath(directory))).as_posix()
            except ValueError:  # another drive (Windows)
                link = Path(r["diagram"]).as_posix()
            lines += [f"![Reliability diagram, {escape_markdown(label)}]({quote(link)})", ""]
    return "\n".join(lines)


def _first_seen(results: list[dict], record: dict) -> int:
    return next(i for i, r in enumerate(results) if (r["dataset"], r["split"]) == (record["dataset"], record["split"]))


def _eval_results(results: list[dict]) -> list[EvalResult]:
    """The fine-tuned model's recorded results as model-index entries."""
    return [
        EvalResult(
            task_type="text-generation" if r["report"].get("kind") == "generation" else "multiple-choice",
            task_name="Calibration of generated answers"
            if r["report"].get("kind") == "generation"
            else "Multiple-choice calibration",
            **dataset_fields(r["dataset"]),
            dataset_split=r["split"],
            metric_type=key,
            metric_name=name,
            metric_value=float(r["report"][key]),
        )
        for r in results
        if not r["base"]
        for key, name in REPORT_METRICS.items()
        if key != "n" and isinstance(r["report"].get(key), (int, float)) and math.isfinite(r["report"][key])
    ]


class CalibrationModelCardMixin:
    """Records calibration results, and writes the card (`create_model_card`, `save_model`) from calib-trl's template."""

    def record_calibration(
        self, report: dict, dataset_name: str, split: str, diagram: str | None = None, base: bool = False
    ) -> None:
        """
        Record a calibration report (`calib_trl.metrics.calibration_report`) for the model card. A later report for
        the same dataset, split and model replaces the earlier one.

        Args:
            report (`dict`): the report; the card shows the keys of `calib_trl.reports.REPORT_METRICS` it holds.
            dataset_name (`str`): a registered name (the embedded datasets), a Hub id, or a local path (named by its
                base name).
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
        Write the model card to `output_dir/README.md` on the main process. `model_name` defaults to the last part of
        `hub_model_id`, else the output directory's name; `dataset_name` (the training data) is linked when it names a
        Hub dataset (a registered name, or a Hub id).
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
        if not self.is_world_process_zero():
            return
        if model_name is None:  # as TRL names the card of a checkpoint
            hub_id = self.args.hub_model_id
            model_name = hub_id.split("/")[-1] if hub_id else Path(self.args.output_dir).name
        for directory in directories:
            os.makedirs(directory, exist_ok=True)
            self._render_card(directory, model_name, dataset_name, tags).save(os.path.join(directory, "README.md"))

    def _card_tags(self, tags) -> list[str]:
        """TRL's tags (`generated_from_trainer`, unsloth, HF Jobs, the trainer's `_tag_names`) and the user's."""
        tags = set() if tags is None else {tags} if isinstance(tags, str) else set(tags)
        if hasattr(self.model.config, "unsloth_version"):
            tags.add("unsloth")
        if "JOB_ID" in os.environ:
            tags.add("hf_jobs")
        tags.update(self._tag_names)
        from trl.trainer.utils import get_trackio_space_url

        trackio_url = get_trackio_space_url()
        if trackio_url is not None:  # as TRL tags it
            tags = {t for t in tags if not t.startswith("trackio:")} | {f"trackio:{trackio_url}"}
        return ["generated_from_trainer", *sorted(tags)]

    def _render_card(self, directory: str, model_name: str, dataset_name, tags) -> ModelCard:
        import datasets
        import tokenizers
        import torch
        import transformers
        import trl
        from transformers.integrations import is_wandb_available
        from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

        base = base_model_id(self.model.config)
        base = base if _is_hub_id(base) else None
        if base is not None:
            base_text = _hub_link(base)
        else:
            local = getattr(self.model.config, "_name_or_path", "") or ""
            base_text = (
                f"`{escape_markdown(os.path.basename(os.path.normpath(local)))}` (a local model)"
                if local
                else "a model not on the Hub"
            )
        dataset_id = hub_dataset_id(dataset_name)
        hub_id = self.hub_model_id or self.args.hub_model_id
        # `licence` is not set: TRL's `generate_model_card` writes `licence: license`, a placeholder, not a licence
        card_data = ModelCardData(
            base_model=base,
            datasets=dataset_id,
            library_name="transformers",
            model_name=model_name,
            tags=self._card_tags(tags),
            eval_results=_eval_results(self.calibration_results) or None,
        )
        if card_data.eval_results:
            card_data.model_name = model_name
        wandb_url = None
        if is_wandb_available():
            import wandb

            wandb_url = wandb.run.url if wandb.run is not None else None
        return ModelCard.from_template(
            card_data,
            template_path=str(resources.files("calib_trl.core").joinpath("templates/model_card.md")),
            model_title=escape_markdown(model_name),
            base_model_text=base_text,
            dataset_text=_hub_link(dataset_id, "datasets/") if dataset_id else None,
            model_id=(hub_id or Path(directory).as_posix()).replace("\\", "\\\\").replace('"', '\\"'),
            calibration_section=calibration_section(
                self._name, self._card_settings(), self.calibration_results, directory
            ),
            wandb_url=wandb_url,
            trackio_url=get_trackio_space_url(),
            comet_url=get_comet_experiment_url(),
            trainer_name=self._name,
            trainer_citation=self._paper["citation"],
            paper_title=self._paper["title"],
            paper_id=self._paper["id"],
            trl_version=trl.__version__,
            transformers_version=transformers.__version__,
            pytorch_version=torch.__version__,
            datasets_version=datasets.__version__,
            tokenizers_version=tokenizers.__version__,
        )
