"""Keep the best evaluation's weights, and stop early when evaluations stop improving.

transformers' ``load_best_model_at_end`` needs a checkpoint saved at every evaluation and kept until the end;
the studio's checkpoints serve resuming instead (worker/resilience.py: every ~10% of the run, copied to the
artifact store, the newest few kept), so tying the two would make every evaluation a save and an upload. The
trainable tensors of an adapter are small (LoRA on MiniLM: ~0.1 M values), so this callback copies them in
memory at each new best evaluation and copies them back when training ends. It holds no collective: in a DDP
job every rank sees the same gathered metrics and makes the same decisions.
"""

import logging
import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.core.tasks import find_task

log = logging.getLogger(__name__)

# Above this many bytes of trainable weights (full fine-tuning of a large model) no copy is kept: the adapter
# is the final weights, and the job's events say so.
MAX_SNAPSHOT_BYTES = 2 * 1024**3


def metric_for(best_metric: str, task: str) -> str | None:
    """The eval metric to keep the best of (``auto``: macro-F1 for classification, loss for causal LM)."""
    if best_metric == "last":
        return None
    if best_metric == "auto":
        info = find_task(task)
        return info.best_metric if info else "loss"
    return best_metric


class BestModelCallback(TrainerCallback):
    """Remembers the trainable weights of the best evaluation by ``metric`` and restores them at train end."""

    def __init__(
        self, model: Any, metric: str, patience: int | None = None, structured_from: Any = None
    ) -> None:
        self.model = model
        self.structured_from = structured_from  # the recipe's metrics object (its last confusion matrix)
        self.best_structured: dict[str, Any] | None = None
        self.metric = metric
        self.greater_is_better = metric != "loss"
        self.patience = patience
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.restored = False
        self.stopped_early_at: int | None = None
        self._snapshot: dict[str, Any] | None = None
        self._since_best = 0
        self._too_large = self._trainable_bytes() > MAX_SNAPSHOT_BYTES

    def _trainable(self) -> dict[str, Any]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._trainable().values())

    @property
    def keeps_weights(self) -> bool:
        """False when the trainable weights are too large to copy (the final weights are kept)."""
        return not self._too_large

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.greater_is_better else value < self.best_value

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Evaluate at the last step too, so the final weights compete (a step interval may not land on it).
        if args.eval_strategy == "steps" and state.max_steps and state.global_step >= state.max_steps:
            control.should_evaluate = True

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is None or not math.isfinite(float(value)):
            return
        if self._better(float(value)):
            self.best_value, self.best_step, self._since_best = float(value), state.global_step, 0
            self.best_metrics = {
                key.removeprefix("eval_"): float(v)
                for key, v in (metrics or {}).items()
                if key.startswith("eval_") and isinstance(v, int | float)
            }
            structured = getattr(self.structured_from, "last_structured", None)
            self.best_structured = dict(structured) if structured else None
            if not self._too_large:
                self._snapshot = {
                    name: p.detach().to("cpu", copy=True) for name, p in self._trainable().items()
                }
            return
        self._since_best += 1
        if self.patience and self._since_best >= self.patience and state.global_step < state.max_steps:
            self.stopped_early_at = state.global_step
            control.should_training_stop = True

    def restore(self, final_step: int) -> bool:
        """Put the best evaluation's weights back (True if they differ from the final step's)."""
        if self._snapshot is None or self.best_step is None or self.best_step == final_step:
            return False
        import torch

        with torch.no_grad():
            for name, param in self._trainable().items():
                saved = self._snapshot.get(name)
                if saved is not None:
                    param.copy_(saved.to(param.device, dtype=param.dtype))
        self.restored = True
        return True
