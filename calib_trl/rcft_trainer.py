from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainingArguments

from .calib_sft_trainer import CalibSFTTrainer
from .losses import confidence_bins, full_lm_head_params, rcft_ece_loss
from .mcq import (
    LETTERS,
    OptionTokenLookup,
    _common_prefix,
    score_multiple_choice,
    tokenize_prompt,
    tokenize_prompt_completion,
    validate_mcq_dataset,
)
from .metrics import calibration_report
from .model_card import COGCALIB_CITATION, RCFT_CITATION
from .rcft_config import RCFTConfig
from .trainer_utils import predicting, resolve_config, shifted, unwrap_base
from .utils import logger

ANSWER_COLUMN = "answer_options"


class RCFTTrainer(CalibSFTTrainer):
    """
    Trainer for CFT and RCFT, from "Restoring Calibration for Aligned Large Language Models: A Calibration-Aware
    Fine-Tuning Approach" (Xiao et al., ICML 2025). A drop-in replacement for [`~trl.SFTTrainer`] on multiple-choice
    data (prompt/completion rows with `choices` and `answer`, see `calib_trl.mcq`).

    Loss: `(1 - ece_weight) * L_SFT + ece_weight * ece_scale * L_ECE`. `L_SFT` is `SFTTrainer`'s loss (on the answer
    with `sft_loss="completion"`; CogCalib's terms can be added through the inherited `calibration_loss`). `L_ECE` is
    an EM-style regulariser:

    - E-step: score a fixed subset of the training rows with the current model (batched, no gradient, sharded across
      processes and gathered, so every process holds the same statistics), put each row in one of `n_bins`
      equal-width bins of its top option probability, and estimate each bin's accuracy. Repeated at the start of every
      epoch, every N steps, or once (`bin_refresh`). Unlike the authors' code, every bin is used, the top one included.
    - M-step (the loss): pull each row's option probabilities, from the option-letter logits at the answer position,
      towards `rcft_target` — top entry equal to its bin's accuracy, the others sharing the rest in rank order. The
      target is a constant of the step (no gradient through it): the E/M alternation regresses the model onto fixed
      targets, and a gradient through the target would also move the statistics it was built from.

    Only the `K` option rows of the LM head are projected at the answer positions (`K x hidden` per example), so
    the term costs almost nothing; the E-step costs one prompt-only forward pass per scored row.

    Args:
        model, args, ...: as in [`CalibSFTTrainer`] / [`~trl.SFTTrainer`].
        estep_dataset (`datasets.Dataset`, *optional*): rows the E-step scores instead of the training rows.
    """

    _tag_names = ["trl", "sft", "calib-trl", "rcft"]
    _name = "RCFT"
    _paper = {
        "title": "Restoring Calibration for Aligned Large Language Models: A Calibration-Aware Fine-Tuning Approach",
        "id": "2505.01997",
        "citation": RCFT_CITATION + "\n\n" + COGCALIB_CITATION,
    }

    def __init__(
        self, model, args: RCFTConfig | TrainingArguments | None = None, *pos_args, estep_dataset=None, **kwargs
    ):
        args = resolve_config(args, RCFTConfig, model, "RCFT")
        train_dataset = kwargs.get("train_dataset", pos_args[1] if len(pos_args) > 1 else None)
        self._rcft_active = args.ece_weight > 0
        if args.calibrates:  # RCFT combined with CogCalib's calibration loss
            self._tag_names = [*type(self)._tag_names, "cogcalib"]
        self._option_ids = None
        self._excluded_rows = 0
        self._bin_stats = None
        self._estep_marker = None  # the epoch / step of the last E-step
        super().__init__(model, args, *pos_args, **kwargs)
        if self._rcft_active and self._virtual_tokens:
            raise ValueError(
                "RCFT's ECE term reads the option-letter logits at each answer position, which prompt-learning "
                "virtual tokens shift; it is not aligned with them yet. Use LoRA, prefix tuning, or `ece_weight=0` "
                "(CFT)."
            )
        self._install_flag_collator((ANSWER_COLUMN,), required=True)
        if self._option_ids is None:
            raise RuntimeError("The answer positions were not located during dataset preparation.")
        estep_rows = estep_dataset if estep_dataset is not None else train_dataset
        if estep_dataset is not None:
            validate_mcq_dataset(estep_dataset, name="estep_dataset")
        if args.estep_samples is not None and len(estep_rows) > args.estep_samples:
            pick = np.random.default_rng(args.seed).choice(len(estep_rows), args.estep_samples, replace=False)
            estep_rows = estep_rows.select(np.sort(pick))
        self._estep_rows = estep_rows

    # -- dataset -------------------------------------------------------------------------------------------------

    def _needs_hidden(self) -> bool:
        return True

    def _adds_terms(self) -> bool:
        return self._rcft_active or super()._adds_terms()

    def _check_dataset(self, dataset, args, dataset_name: str) -> None:
        super()._check_dataset(dataset, args, dataset_name)
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"RCFT needs a `datasets.Dataset` (an `IterableDataset` cannot be scored by the E-step), got "
                f"{type(dataset).__name__} as the {dataset_name} dataset."
            )
        validate_mcq_dataset(dataset, name=f"{dataset_name} dataset", require_completion=True)

    def _reads_lm_head(self) -> bool:
        return self._rcft_active or super()._reads_lm_head()

    def _columns_to_carry(self, args) -> tuple[tuple[str, ...], tuple[str, ...]]:
        # The prompt/completion/choices columns ride along through TRL's maps; `_post_tokenize` uses them to locate
        # the answer, and writes the per-token `answer_options` column the collator carries
        carried, flags = super()._columns_to_carry(args)
        return (*carried, "choices"), (*flags, ANSWER_COLUMN)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if formatting_func is not None:
            raise ValueError(
                "RCFT needs prompt/completion rows to find the answer position; a `formatting_func` "
                "turns them into plain text. Format the prompts before passing the dataset instead."
            )
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _on_rows_dropped(self, dropped: int, total: int, args, dataset_name: str) -> None:
        if args.invalid_rows == "raise":
            raise ValueError(
                f"{dropped} of the {total} rows of the {dataset_name} dataset have prompts too long for "
                f"`max_length={args.max_length}`: truncation cuts off their answer position (and their whole "
                "completion). Raise `max_length`, drop those rows, or set `invalid_rows='exclude'`."
            )
        super()._on_rows_dropped(dropped, total, args, dataset_name)
        self._excluded_rows += dropped

    def _post_tokenize(self, dataset, processing_class, args, dataset_name):
        dataset = super()._post_tokenize(dataset, processing_class, args, dataset_name)
        tok = getattr(processing_class, "tokenizer", processing_class)
        k_max = max(len(c) for c in dataset["choices"])
        lookup = OptionTokenLookup(tok, k_max, self.chat_template)
        if args.packing and args.packing_strategy != "bfd":
            raise ValueError(
                f"RCFT needs each question whole: `packing_strategy={args.packing_strategy!r}` can cut a question off "
                "its answer. Use `packing_strategy='bfd'`."
            )
        keep_end = args.truncation_mode == "keep_end" and args.max_length is not None and not args.packing
        # With packing, preparation skips truncation and bfd packing keeps the first `max_length` tokens
        limit = args.max_length if args.packing and args.max_length is not None else None
        markers, problems = [], []
        option_ids = self._option_ids
        for i, row in enumerate(dataset.select_columns(["prompt", "completion", "choices", "answer", "input_ids"])):
            ids = row["input_ids"]
            prompt_ids = tokenize_prompt(tok, row["prompt"], self.chat_template)
            full = tokenize_prompt_completion(tok, row["prompt"], row["completion"], self.chat_template)
            start = _common_prefix(prompt_ids, full)
            position = start - (len(full) - len(ids)) if keep_end else start
            letters = lookup(row["prompt"], prompt_ids, row["completion"])
            if option_ids is None:
                option_ids = letters
            elif letters[: len(option_ids)] != option_ids[: len(letters)]:
                raise ValueError(
                    f"Row {i} of the {dataset_name} dataset ends its prompt differently from the first row, so its "
                    "option letters map to other tokens; RCFT needs one prompt format per dataset."
                )
            k = len(row["choices"])
            answer = (
                row["answer"] if isinstance(row["answer"], int) else LETTERS.index(str(row["answer"]).strip().upper())
            )
            marker = [0] * len(ids)
            kept = len(ids) if limit is None else min(len(ids), limit)
            if not 0 <= position < kept:
                problems.append(
                    (
                        i,
                        f"its answer position ({position}) is outside the {kept} tokens kept "
                        f"(`max_length={args.max_length}` cuts it off)",
                    )
                )
            elif ids[position] != letters[answer]:
                problems.append(
                    (
                        i,
                        f"its completion starts with {tok.decode([ids[position]])!r} instead of the answer "
                        f"letter {LETTERS[answer]!r}",
                    )
                )
            else:
                marker[position] = k
            markers.append(marker)
        if problems:
            i, why = problems[0]
            if args.invalid_rows == "raise":
                raise ValueError(
                    f"Row {i} of the {dataset_name} dataset cannot get RCFT's ECE term: {why}. "
                    f"{len(problems)} row(s) are affected; fix them, or set `invalid_rows='exclude'` to train them "
                    "with the SFT loss only."
                )
            logger.warning(
                "%d row(s) of the %s dataset are excluded from the ECE term (first: row %d, %s).",
                len(problems),
                dataset_name,
                i,
                why,
            )
            self._excluded_rows += len(problems)
        self._option_ids = option_ids
        return dataset.add_column(ANSWER_COLUMN, markers)

    # -- loss ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        answers = inputs.pop(ANSWER_COLUMN, None)
        if answers is None:
            raise KeyError(
                f"The batch has no `{ANSWER_COLUMN}` tensor; use `calib_trl.DataCollatorWithKnowledgeFlags`."
            )
        if not self._rcft_active:  # CFT
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._bin_stats is None or (mode == "train" and self._estep_due()):
            self._estep(model)
        args = self.args
        with self._capture.capture():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            hidden = self._capture.hidden
            n_tokens = self._capture.output.label_mask.sum()
            base = result[0] if return_outputs else result
            at = shifted(answers, inputs) > 0
            probs, num_choices = self._option_probs(
                model, predicting(hidden, inputs)[at], shifted(answers, inputs)[at]
            )
        conf = probs.detach().max(-1).values
        bins = confidence_bins(conf, args.n_bins)
        accuracy = self._bin_stats["accuracy"].to(conf.device)[bins]
        # A bin the E-step left empty has no estimate: its rows keep their own confidence as the top target
        accuracy = torch.where(torch.isnan(accuracy), conf, accuracy)
        ece = rcft_ece_loss(probs, bins, accuracy, args.n_bins, num_choices)
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        scale = 1.0 / steps if (num_items_in_batch is not None and mode == "train") else 1.0
        loss = (1 - args.ece_weight) * base + args.ece_weight * args.ece_scale * ece * scale

        self._log_mean(mode, "rcft/ece_loss", ece.detach(), torch.ones((), device=ece.device))
        # `base` is this micro-batch's share of the step's token-normalised loss; log its token mean instead
        denominator = n_tokens if num_items_in_batch is None else num_items_in_batch
        sft_sum = base.detach() / self._loss_scale(num_items_in_batch) * torch.as_tensor(denominator).clamp(min=1)
        self._log_mean(mode, "rcft/sft_loss", sft_sum, n_tokens)
        stats = self._bin_stats
        for key in ("estep_accuracy", "estep_ece", "estep_cw_ece"):
            self._metrics[mode][f"rcft/{key}"] = [stats[key]]
        if self._excluded_rows:
            self._metrics[mode]["rcft/excluded_rows"] = [self._excluded_rows]
        loss = self._guard_nonfinite(loss, model)
        return (loss, result[1]) if return_outputs else loss

    def _option_probs(self, model, hidden: torch.Tensor, num_choices: torch.Tensor):
        """Softmax over the option-letter logits at the answer positions: only `K` rows of the LM head are used."""
        lm_head = unwrap_base(model).get_output_embeddings()
        weight, bias, ctx = full_lm_head_params(lm_head)
        ids = torch.tensor(self._option_ids, device=hidden.device)
        with ctx:  # K rows only: in float32, so that bf16 does not round the option logits before the softmax
            y = hidden.float() @ weight[ids].float().t()
            if bias is not None:
                y = y + bias[ids].float()
        z = y * self._head_transform["logit_scale"]
        if self._head_transform["softcap"] is not None:
            cap = self._head_transform["softcap"]
            z = cap * torch.tanh(z / cap)
        num_choices = num_choices.long()
        valid = torch.arange(len(ids), device=z.device)[None, :] < num_choices[:, None]
        return z.masked_fill(~valid, float("-inf")).softmax(-1), num_choices

    # -- E-step --------------------------------------------------------------------------------------------------

    def _estep_due(self) -> bool:
        refresh = self.args.bin_refresh
        if self._bin_stats is None:
            return True
        if refresh == "once":
            return False
        if refresh == "epoch":
            return int(self.state.epoch + 1e-9) != self._estep_marker
        return self.state.global_step % int(refresh) == 0 and self.state.global_step != self._estep_marker

    @torch.no_grad()
    def estimate_bins(self, model=None) -> dict:
        """The E-step: per-bin counts, accuracies and mean confidences of the current model on the E-step rows."""
        model = model if model is not None else self.model
        scores = score_multiple_choice(
            model,
            self._tokenizer,
            self._estep_rows,
            batch_size=self.args.estep_batch_size,
            desc="RCFT E-step",
            progress=not self.args.disable_tqdm,
            shard=True,
            chat_template=self.chat_template,
        )
        n_bins = self.args.n_bins
        conf = torch.tensor(scores.confidences, dtype=torch.float64)
        correct = torch.tensor(scores.correct, dtype=torch.float64)
        bins = confidence_bins(conf, n_bins)
        counts = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
        hits = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
        conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
        report = calibration_report(scores.probs, scores.labels, n_bins=n_bins)
        return {
            "counts": counts,
            "accuracy": (hits / counts).float(),  # NaN for empty bins
            "confidence": (conf_sum / counts).float(),
            "estep_accuracy": report["accuracy"],
            "estep_ece": report["ece"],
            "estep_cw_ece": report["cw_ece"],
        }

    def _estep(self, model) -> None:
        self._bin_stats = self.estimate_bins(model)
        refresh = self.args.bin_refresh
        self._estep_marker = int(self.state.epoch + 1e-9) if refresh == "epoch" else self.state.global_step
        s = self._bin_stats
        logger.info(
            "RCFT E-step at step %d: accuracy %.4f, conf-ECE %.4f, class-wise ECE %.4f; bin counts %s",
            self.state.global_step,
            s["estep_accuracy"],
            s["estep_ece"],
            s["estep_cw_ece"],
            s["counts"].long().tolist(),
        )

    # -- state, model card ---------------------------------------------------------------------------------------

    def _calib_state(self) -> dict:
        state = super()._calib_state()
        if self._bin_stats is not None:
            state["rcft_bins"] = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in self._bin_stats.items()}
            state["rcft_estep_marker"] = self._estep_marker
        return state

    def _load_calib_state(self, state: dict) -> None:
        super()._load_calib_state(state)
        if "rcft_bins" in state:
            bins = state["rcft_bins"]
            self._bin_stats = {
                k: (
                    torch.tensor(v, dtype=torch.float64 if k == "counts" else torch.float32)
                    if isinstance(v, list)
                    else v
                )
                for k, v in bins.items()
            }
            self._estep_marker = state["rcft_estep_marker"]

    def _card_settings(self) -> dict:
        a = self.args
        settings = {
            "ece_weight": a.ece_weight,
            "ece_scale": a.ece_scale,
            "n_bins": a.n_bins,
            "sft_loss": a.sft_loss,
            "bin_refresh": a.bin_refresh,
        }
        if a.calibrates:
            settings.update(super()._card_settings())
        return settings
