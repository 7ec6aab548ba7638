"""The job spec: the one contract between the API, the job form and the worker."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.settings import BUNDLED_MODEL_ID
from worker.methods import registry

Task = Literal["sequence-classification"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


class TrainingSettings(BaseModel):
    """Training arguments handed to transformers.Trainer."""

    model_config = ConfigDict(extra="forbid")

    num_epochs: float | None = Field(
        default=1.0, gt=0, le=1000, description="Passes over the training data (ignored when max steps is set)."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many optimizer steps; overrides epochs."
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Examples per training step.")
    learning_rate: float = Field(default=5e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Scheduler = Field(default="linear", description="How the learning rate changes over training.")
    warmup_ratio: float = Field(default=0.0, ge=0, le=0.5, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_length: int = Field(default=128, ge=8, le=32768, description="Longer texts are truncated to this many tokens.")
    logging_steps: int = Field(default=10, ge=1, le=100_000, description="Log train loss every N steps.")
    eval_steps: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Evaluate every N steps; empty evaluates once per epoch."
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed for the split, init and order.")
    disable_dropout: bool = Field(
        default=True,
        description="Switch off the base model's dropout. On CPUs dropout costs more time than the matrix "
        "multiplies, and adapters training a few % of weights need little of its regularisation.",
    )
    group_by_length: bool = Field(
        default=True, description="Batch texts of similar length together so less compute goes to padding."
    )

    @model_validator(mode="after")
    def _needs_a_length(self) -> "TrainingSettings":
        if self.num_epochs is None and self.max_steps is None:
            raise ValueError("set num_epochs or max_steps: training needs to know when to stop")
        return self


class JobSpec(BaseModel):
    """Everything a worker needs to run one fine-tuning job."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200, description="A name for the job; empty picks one.")
    base_model: str = Field(
        default=BUNDLED_MODEL_ID,
        min_length=1,
        max_length=500,
        description="The bundled model, a local folder with a transformers model, or a hub id already cached.",
    )
    task: Task = Field(default="sequence-classification", description="What the model learns to do.")
    dataset_id: int = Field(ge=1, description="The training dataset.")
    text_column: str = Field(default="text", min_length=1, description="Column holding the input text.")
    label_column: str = Field(default="label", min_length=1, description="Column holding the class label.")
    validation_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Share of the training rows held out for evaluation."
    )
    validation_dataset_id: int | None = Field(
        default=None, ge=1, description="A separate evaluation dataset; overrides the held-out fraction."
    )
    method: str = Field(default="lora", description="The fine-tuning method.")
    method_config: dict[str, Any] = Field(
        default_factory=dict, description="The method's own settings (see GET /api/v1/methods)."
    )
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    @model_validator(mode="after")
    def _validate_method_config(self) -> "JobSpec":
        methods = registry()
        if self.method not in methods:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(sorted(methods))}")
        info = methods[self.method]
        if self.task not in info.tasks:
            raise ValueError(f"method {self.method!r} does not support task {self.task!r}")
        self.method_config = info.config.model_validate(self.method_config).model_dump(mode="json")
        return self

    def method_settings(self) -> BaseModel:
        """The method config as its typed model."""
        return registry()[self.method].config.model_validate(self.method_config)
