"""Evaluate a preference adapter on held-out preference data: the implicit DPO rewards people read.

For every pair, the rewards are DPO's implicit ones, ``beta * (log p_policy(answer) - log p_reference(answer))``,
summed over the answer's tokens, with the reference the base model with the adapter switched off (or, for a
method that changes the base's own weights, a freshly loaded base model), as in training. From them: reward
accuracy (share of pairs whose chosen answer out-scores the rejected one), the mean margin, the mean chosen and
rejected rewards, and DPO's sigmoid loss ``-log sigmoid(margin)``; all per pair in the CSV.

trl does the work where it can: the examples are rendered as in training (worker/recipes/preference_data.py),
then tokenized, truncated and collated by trl's ``DPOTrainer`` (built here for evaluation only, never trained),
and the log-probabilities come from trl's fused LM head (``fused_lm_head=True``), the reference's through
``DPOTrainer.compute_ref_log_probs``. So the numbers are those trl reports for the same rows during training.

KTO data (answers marked good or bad, no pairs): each answer gets its reward; reward accuracy is the share whose
sign agrees with its label (good above zero, bad below), chosen/rejected are the mean rewards of the good and the
bad answers, and the margin their difference. There is no pair, so no DPO loss. Each answer goes through trl's
pair collator as both halves of a pair, so these rows cost twice the compute of their tokens.
"""

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.core.base_models import resolve_base_model
from app.core.errors import InvalidDataset
from app.core.formats import preference_example_from_row
from app.core.spec import JobSpec, PreferenceSettings
from app.core.tasks import PREFERENCE
from worker.methods import BuildContext, get_method
from worker.recipes.preference_data import RenderedExample, job_renderer

log = logging.getLogger(__name__)

STUDIO_FILE = "studio.json"
# Pairs per forward (each pair is two sequences); the tiny CPU batches of training are no help here.
PAIRS_PER_BATCH = {"cpu": 8, "cuda": 32}


@dataclass
class PairScore:
    """One pair's (or one KTO answer's) log-probabilities under the policy and the reference."""

    chosen_logp: float
    rejected_logp: float
    ref_chosen_logp: float
    ref_rejected_logp: float


@dataclass
class LoadedPreferenceModel:
    """The adapter on its base, the reference (None: the same model with the adapter switched off), how the
    reference was made (for the page), the adapter's tokenizer and its studio.json."""

    model: Any
    reference: Any
    reference_label: str
    tokenizer: Any
    studio: dict[str, Any]


def load_for_evaluation(folder: Path, start_folder: Path | None = None) -> LoadedPreferenceModel:
    """Load a preference adapter as training built it, outside inference mode (trl's trainer sets up the model).

    A peft adapter is loaded as the ``default`` adapter of a base model, so the base is its reference with the
    adapter switched off; ``start_folder`` (the supervised adapter the job continued) becomes trl's ``ref``
    adapter instead, the job's own reference. Other methods get a second, frozen copy of the base.
    """
    from transformers import AutoTokenizer

    from worker.recipes import get_recipe

    studio = json.loads((folder / STUDIO_FILE).read_text(encoding="utf-8"))
    base = resolve_base_model(studio["base_model"])
    method = get_method(studio["method"])
    settings = method.config.model_validate(studio["spec"]["method_config"])
    load_kwargs = method.load_kwargs(settings, BuildContext(task=studio["task"]))
    recipe = get_recipe(PREFERENCE)
    model = method.load(recipe.load_base(base, studio, load_kwargs), str(folder), "default")
    model.eval()
    reference = None
    if method.saved_as == "peft":
        label = "the base model (adapter switched off)"
        if start_folder is not None:
            label = "the supervised adapter the job started from"
    else:
        reference = recipe.load_base(base, studio, load_kwargs)
        reference.eval()
        for param in reference.parameters():
            param.requires_grad_(False)
        label = "a frozen copy of the base model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return LoadedPreferenceModel(model, reference, label, tokenizer, studio)


def _trainer(
    loaded: LoadedPreferenceModel,
    records: list[dict[str, Any]],
    spec: JobSpec,
    beta: float,
    work_dir: Path,
    start_folder: Path | None,
) -> Any:
    """trl's DPOTrainer over the records, for its tokenization, collator and reference log-probabilities."""
    from datasets import Dataset as HFDataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(work_dir / "trl"),
        beta=beta,
        max_length=spec.training.max_length,
        disable_dropout=True,
        gradient_checkpointing=False,
        dataset_num_proc=None,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = DPOTrainer(
        model=loaded.model,
        ref_model=loaded.reference,
        args=args,
        train_dataset=HFDataset.from_list(records),
        processing_class=loaded.tokenizer,
    )
    model: Any = trainer.model
    if loaded.reference is None and "ref" in getattr(model, "peft_config", {}):
        # trl copied the adapter as its reference ("re-training an existing adapter"); the reference is the base
        # with the adapter off, or the supervised adapter the job started from. A copy that cannot be deleted
        # fails the evaluation rather than scoring the adapter against itself.
        model.delete_adapter("ref")
        if start_folder is not None:
            model.load_adapter(str(start_folder), adapter_name="ref")
        model.set_adapter("default")
    return trainer


def _policy_logps(trainer: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probabilities of the policy (chosen, rejected), the way trl's DPO loss computes them."""
    model_kwargs: dict[str, Any] = {k: v for k, v in batch.items() if k != "completion_mask"}
    model_kwargs["use_cache"] = False
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    seq_len = batch["completion_mask"].size(1) - 1
    log_probs = trainer.model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
    # Prompt-learning methods prepend virtual tokens: keep the positions of the real tokens (as trl does)
    logps = log_probs[:, -seq_len:].sum(dim=1)
    chosen, rejected = logps.chunk(2, dim=0)
    return chosen, rejected


@torch.no_grad()
def score_pairs(trainer: Any, pairs_per_batch: int) -> list[PairScore]:
    """Policy and reference log-probabilities of every tokenized pair, in dataset order."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        trainer.train_dataset, batch_size=pairs_per_batch, collate_fn=trainer.data_collator, shuffle=False
    )
    device = trainer.accelerator.device
    scores: list[PairScore] = []
    trainer.model.eval()
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        chosen, rejected = _policy_logps(trainer, batch)
        # trl scores the model it is given: its frozen reference copy, or the policy with the adapter switched off
        reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(reference, batch)
        for values in zip(chosen, rejected, ref_chosen, ref_rejected, strict=True):
            scores.append(PairScore(*(float(value) for value in values)))
    return scores


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _rendered(
    rows: list[dict[str, Any]], settings: PreferenceSettings, spec: JobSpec, tokenizer: Any
) -> tuple[list[RenderedExample], int, int]:
    """The rows rendered as in training; (kept, truncated, dropped: prompt alone fills max length)."""
    probe = spec.model_copy(update={PREFERENCE: settings})
    renderer, _ = job_renderer(probe, tokenizer)
    rendered = [
        renderer.render(preference_example_from_row(row, settings, number), number)
        for number, row in enumerate(rows, start=1)
    ]
    kept = [example for example in rendered if example.prompt_tokens < renderer.max_length]
    return kept, sum(example.truncated for example in kept), len(rendered) - len(kept)


def evaluate_preference(
    folder: Path,
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    target: Path,
    work_dir: Path,
    start_folder: Path | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Rewards, reward accuracy and margin (and DPO's loss for pairs) of the adapter in ``folder`` over the rows;
    the per-row CSV written to ``target``. Returns (metrics, details)."""
    data = PreferenceSettings.model_validate(settings[PREFERENCE])
    beta = float(settings["beta"])
    loaded = load_for_evaluation(folder, start_folder)
    spec = JobSpec.model_validate(loaded.studio["spec"])
    examples, truncated, dropped = _rendered(rows, data, spec, loaded.tokenizer)
    if not examples:
        raise InvalidDataset(
            f"No example has an answer token left within the adapter's max_length {spec.training.max_length}: "
            "the prompts are longer than that; nothing to score."
        )
    kto = data.format == "kto"
    records = [
        {"prompt": e.prompt, "chosen": e.completion, "rejected": e.completion}
        if kto
        else {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
        for e in examples
    ]
    trainer = _trainer(loaded, records, spec, beta, work_dir, start_folder)
    if len(trainer.train_dataset) != len(records):  # trl dropped a row: the scores would not line up
        raise InvalidDataset("trl dropped examples while tokenizing; nothing to score reliably.")
    device_type = trainer.accelerator.device.type
    scores = score_pairs(trainer, PAIRS_PER_BATCH.get(device_type, PAIRS_PER_BATCH["cpu"]))
    chosen_rewards = [beta * (s.chosen_logp - s.ref_chosen_logp) for s in scores]
    rejected_rewards = [beta * (s.rejected_logp - s.ref_rejected_logp) for s in scores]
    with target.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        if kto:
            metrics, details = _kto_metrics(examples, chosen_rewards, scores, writer)
        else:
            metrics, details = _pair_metrics(examples, chosen_rewards, rejected_rewards, scores, writer)
    metrics.update(
        {
            "examples": float(len(examples)),
            "truncated_examples": float(truncated),
            "dropped_examples": float(dropped),
        }
    )
    details.update(
        {
            "beta": beta,
            "reference": loaded.reference_label,
            "format": data.format,
            "trained_loss": spec.preference.loss,
        }
    )
    del trainer, loaded
    return metrics, details


def _pair_metrics(
    examples: list[RenderedExample],
    chosen: list[float],
    rejected: list[float],
    scores: list[PairScore],
    writer: Any,
) -> tuple[dict[str, float], dict[str, Any]]:
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    # DPO's sigmoid loss, as trl computes it: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio))
    losses = [float(-F.logsigmoid(torch.tensor(margin, dtype=torch.float64))) for margin in margins]
    writer.writerow(
        ["row", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "margin", "correct",
         "loss", "logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected"]
    )  # fmt: skip
    for example, c, r, margin, loss, score in zip(
        examples, chosen, rejected, margins, losses, scores, strict=True
    ):
        writer.writerow(
            [example.row, example.prompt, example.chosen, example.rejected, f"{c:.6f}", f"{r:.6f}",
             f"{margin:.6f}", int(margin > 0), f"{loss:.6f}", f"{score.chosen_logp:.4f}",
             f"{score.rejected_logp:.4f}", f"{score.ref_chosen_logp:.4f}", f"{score.ref_rejected_logp:.4f}"]
        )  # fmt: skip
    metrics = {
        "rewards/accuracies": _mean([float(margin > 0) for margin in margins]),
        "rewards/margins": _mean(margins),
        "rewards/chosen": _mean(chosen),
        "rewards/rejected": _mean(rejected),
        "logps/chosen": _mean([s.chosen_logp for s in scores]),
        "logps/rejected": _mean([s.rejected_logp for s in scores]),
        "loss": _mean(losses),
    }
    return metrics, {"loss": "DPO's sigmoid loss, -log sigmoid(reward margin), averaged over the pairs"}


def _kto_metrics(
    examples: list[RenderedExample], rewards: list[float], scores: list[PairScore], writer: Any
) -> tuple[dict[str, float], dict[str, Any]]:
    good = [reward for example, reward in zip(examples, rewards, strict=True) if example.label]
    bad = [reward for example, reward in zip(examples, rewards, strict=True) if not example.label]
    agrees = [(reward > 0) == bool(example.label) for example, reward in zip(examples, rewards, strict=True)]
    writer.writerow(["row", "prompt", "completion", "label", "reward", "correct", "logp", "ref_logp"])
    for example, reward, agree, score in zip(examples, rewards, agrees, scores, strict=True):
        writer.writerow(
            [example.row, example.prompt, example.completion, str(bool(example.label)).lower(),
             f"{reward:.6f}", int(agree), f"{score.chosen_logp:.4f}", f"{score.ref_chosen_logp:.4f}"]
        )  # fmt: skip
    metrics = {
        "rewards/accuracies": _mean([float(agree) for agree in agrees]),
        "rewards/chosen": _mean(good),
        "rewards/rejected": _mean(bad),
        "rewards/margins": _mean(good) - _mean(bad),
        "logps/chosen": _mean([s.chosen_logp for e, s in zip(examples, scores, strict=True) if e.label]),
        "logps/rejected": _mean(
            [s.chosen_logp for e, s in zip(examples, scores, strict=True) if not e.label]
        ),
        "desirable_examples": float(len(good)),
        "undesirable_examples": float(len(bad)),
    }
    return metrics, {
        "accuracy": "the share of answers whose reward has the sign of their label (good > 0, bad < 0)",
        "loss": "none: KTO data has no pairs for DPO's loss",
    }
