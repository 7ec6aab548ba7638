"""The job spec: the one contract between the API, the job form and the worker."""

from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from app.core.chat_templates import TemplateName
from app.core.method_registry import registry
from app.core.settings import BUNDLED_MODEL_ID
from app.core.tasks import CAUSAL_LM, CLASSIFICATION, task_names

if TYPE_CHECKING:
    Task = str
else:  # the registered tasks, in form order: the schema's enum and the form's choices
    Task = Literal[task_names()]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"]
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
Packing = Literal["auto", "on", "off", "rows"]
Strategy = Literal["auto", "ddp", "fsdp"]


AUTO: Literal["auto"] = "auto"
Auto = Literal["auto"]
BestMetric = Literal["auto", "accuracy", "f1_macro", "loss", "last"]
# Settings that take ``auto`` or a number: (lowest, highest, lowest allowed itself).
AUTO_RANGES: dict[str, tuple[float, float, bool]] = {
    "num_epochs": (0, 1000, False),
    "learning_rate": (0, 1, False),
    "warmup_ratio": (0, 0.5, True),
    "logging_steps": (1, 100_000, True),
    "eval_steps": (1, 1_000_000, True),
}


class TrainingSettings(BaseModel):
    """How training runs; settings left on auto are chosen from the data and the model (docs/defaults.md)."""

    model_config = ConfigDict(extra="forbid")

    num_epochs: float | Auto | None = Field(
        default=AUTO,
        description="Passes over the training data (ignored when max steps is set); auto: enough passes for at "
        "least 200 optimizer steps, at most 20 (docs/defaults.md).",
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Stop after this many optimizer steps; overrides epochs.",
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Examples per training step.")
    learning_rate: float | Auto = Field(
        default=AUTO,
        description="Peak learning rate; auto: the method's typical rate, scaled up for small base models.",
    )
    lr_scheduler: Scheduler = Field(
        default="linear", description="How the learning rate changes over training."
    )
    warmup_ratio: float | Auto = Field(
        default=AUTO, description="Fraction of steps spent warming up; auto: 0.06."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_length: int = Field(
        default=128, ge=8, le=32768, description="Longer texts are truncated to this many tokens."
    )
    logging_steps: int | Auto = Field(
        default=AUTO,
        description="Log train loss every N steps; auto: about 20 points, at least every 10 steps.",
    )
    eval_steps: int | Auto | None = Field(
        default=AUTO,
        description="Evaluate every N steps; empty evaluates once per epoch; auto: up to 10 evaluations, fewer "
        "when the held-out set is large (they cost at most ~10% of the run).",
    )
    best_metric: BestMetric = Field(
        default="auto",
        description="The held-out metric whose best evaluation the adapter keeps (its weights are restored at "
        "the end); auto: macro-F1 for classification, loss for causal LM; last keeps the final weights.",
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Stop after this many evaluations in a row without a better best metric; empty: never.",
    )
    auto_fields: list[str] = Field(
        default_factory=list,
        description="Set by the studio: the settings above that were auto and what the rule chose for them.",
    )
    seed: int = Field(
        default=42, ge=0, le=2**31 - 1, description="Random seed for the split, init and order."
    )
    disable_dropout: bool = Field(
        default=True,
        description="Switch off the base model's dropout. On CPUs dropout costs more time than the matrix "
        "multiplies, and adapters training a few % of weights need little of its regularisation.",
    )
    group_by_length: bool = Field(
        default=True, description="Batch texts of similar length together so less compute goes to padding."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Training arithmetic: auto uses bf16 mixed precision on a GPU that supports it and fp32 on "
        "CPUs (bf16 matmuls are several times slower than fp32 on CPUs without AMX).",
    )
    save_steps: int | None = Field(
        default=None,
        ge=0,
        le=10_000_000,
        description="Save a checkpoint every N steps (a failed or cancelled job resumes from the last one); "
        "empty saves about every 10% of the run but no more often than every 25 steps, 0 saves none.",
    )
    save_total_limit: int = Field(
        default=2, ge=1, le=100, description="How many of the newest checkpoints are kept."
    )
    # ---- speed and memory (issue 22, docs/performance.md) ----
    optimizer: Optimizer = Field(
        default="adamw_torch",
        description="adamw_torch: PyTorch AdamW; adamw_torch_fused: its fused kernel (CUDA and CPU); adamw_8bit "
        "and paged_adamw_8bit: bitsandbytes' 8-bit AdamW (paged: spills optimizer state to CPU memory under "
        "pressure), for full fine-tuning on a GPU (they need accelerator gpu).",
    )
    gradient_checkpointing: Literal["off", "on"] = Field(
        default="off",
        description="Recompute each layer's activations in the backward pass instead of keeping them "
        "(non-reentrant variant): far less activation memory for about a third more compute.",
    )
    liger: Literal["auto", "off"] = Field(
        default="auto",
        description="Liger Kernel's fused Triton kernels (RMSNorm, RoPE, SwiGLU, linear + cross-entropy without "
        "the vocabulary-sized logits): auto applies them on CUDA when liger-kernel is installed and the model is "
        "a Llama, Mistral, Qwen2/3, Gemma or Phi3; the job's events say when and why not.",
    )
    attention: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flex_attention"] = Field(
        default="auto",
        description="The attention kernel of a causal-LM job's model. sdpa_varlen: packed examples attend "
        "within themselves only (SDPA's causal kernel per example, or one flash-attention varlen call on a CUDA "
        "GPU in bf16/fp16), instead of a row-wide block-diagonal mask; auto uses it for packed rows on CPU "
        "workers and keeps the model's default (SDPA) elsewhere. flex_attention (PyTorch FlexAttention, "
        "compiled) skips the blocks the mask rules out; it needs accelerator gpu (no backward pass on CPUs).",
    )
    torch_compile: bool = Field(
        default=False,
        description="torch.compile the model before training. Off by default: on CPUs it did not pay in our "
        "measurements (docs/benchmarks.md); try it on a GPU for long runs.",
    )
    # ---- end speed and memory ----

    @field_validator(*AUTO_RANGES, mode="wrap")
    @classmethod
    def _auto_or_number(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        # One message per field (a plain union would report each member: "learning_rate.float", ...). Forms send
        # text: "" is empty where empty is allowed, any spelling of auto is auto.
        name = info.field_name or ""
        low, high, inclusive = AUTO_RANGES[name]
        if isinstance(value, str):
            value = value.strip()
            if value.lower() == AUTO:
                return AUTO
            if value == "" and name in ("num_epochs", "eval_steps"):
                return None
        bound = f"{'>=' if inclusive else '>'} {low:g} and <= {high:g}"
        try:
            parsed = handler(value)
        except ValidationError:
            raise ValueError(f"must be auto or a number {bound}, not {value!r}") from None
        if isinstance(parsed, int | float) and not (
            (low <= parsed if inclusive else low < parsed) and parsed <= high
        ):
            raise ValueError(f"must be auto or a number {bound}, not {value!r}")
        return parsed

    @model_validator(mode="after")
    def _needs_a_length(self) -> "TrainingSettings":
        if self.num_epochs is None and self.max_steps is None:
            raise ValueError("set num_epochs or max_steps: training needs to know when to stop")
        return self


DataFormat = Literal["alpaca", "prompt-completion", "chat", "text"]


class CausalLMSettings(BaseModel):
    """Causal-LM data: which columns hold prompts and responses, the chat template, loss masking and packing."""

    model_config = ConfigDict(extra="forbid")

    format: DataFormat = Field(
        default="alpaca",
        description="How rows become training text: alpaca (instruction, input, output), prompt-completion, "
        "chat (a list of role/content messages) or text (plain text for continued pre-training).",
    )
    instruction_column: str = Field(
        default="instruction", min_length=1, description="Alpaca: the instruction."
    )
    input_column: str | None = Field(
        default="input",
        description="Alpaca: optional context appended to the instruction; empty if the data has no such column.",
    )
    output_column: str = Field(default="output", min_length=1, description="Alpaca: the response to learn.")
    prompt_column: str = Field(default="prompt", min_length=1, description="Prompt-completion: the prompt.")
    completion_column: str = Field(
        default="completion", min_length=1, description="Prompt-completion: the completion to learn."
    )
    messages_column: str = Field(
        default="messages",
        min_length=1,
        description="Chat: a list of {role, content} messages (system, user, assistant); every assistant "
        "message is learned.",
    )
    system_prompt: str | None = Field(
        default=None,
        max_length=4000,
        description="A system message put before every example that has none (empty: none).",
    )
    template: TemplateName = Field(
        default="auto",
        description="Chat template: auto uses the tokenizer's own and falls back to alpaca when it has none; "
        "alpaca, chatml or plain (no markup) override it. The adapter records it and try-out uses it.",
    )
    train_on_prompt: bool = Field(
        default=False,
        description="Also compute the loss on prompt tokens. Off: only responses are learned (prompt masked).",
    )
    packing: Packing = Field(
        default="auto",
        description="on: padding-free packing, each batch's examples concatenated with positions restarting "
        "per example, so no token is padding and no example attends to another (same loss as off); rows: the "
        "whole set packed once into rows of max length tokens, batch size then counts rows; off: one padded "
        "example per row; auto: on where the model and method allow it (docs/performance.md). true/false mean "
        "rows/off.",
    )

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_from_bool(cls, value: Any) -> Any:
        # Specs from before packing had modes said true/false; true was today's rows.
        if isinstance(value, bool):
            return "rows" if value else "off"
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return "rows" if value.strip().lower() == "true" else "off"
        return value


PreferenceFormat = Literal["pairs", "kto"]
PreferenceLoss = Literal["dpo", "ipo", "orpo", "simpo", "kto"]
# The loss's own default beta (trl's defaults; SimPO's paper recommends 2.0 to 2.5).
DEFAULT_BETA: dict[str, float] = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


class PreferenceSettings(BaseModel):
    """Preference tuning: where the prompts and the better and worse answers are, the loss and its settings."""

    model_config = ConfigDict(extra="forbid")

    loss: PreferenceLoss = Field(
        default="dpo",
        description="dpo: Direct Preference Optimization (sigmoid loss against the reference model); ipo: its "
        "IPO variant (squared loss, less prone to overfitting); orpo: odds-ratio loss plus the chosen answer's "
        "language-model loss, no reference model; simpo: length-normalised reward with a target margin, no "
        "reference model; kto: answers marked good or bad (Kahneman-Tversky Optimization).",
    )
    beta: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="How far the model may move from the reference (DPO, KTO: the KL weight; IPO: tau; ORPO: the "
        "odds-ratio weight lambda; SimPO: the reward scale). Empty: the loss's usual value (0.1; SimPO 2.0).",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="DPO: the share of pairs assumed to be mislabelled (conservative DPO); 0 trusts every pair.",
    )
    simpo_gamma: float = Field(
        default=0.5,
        ge=0,
        le=10,
        description="SimPO: the target reward margin (gamma) between chosen and rejected.",
    )
    desirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="KTO: loss weight of answers marked good."
    )
    undesirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="KTO: loss weight of answers marked bad."
    )
    format: PreferenceFormat = Field(
        default="pairs",
        description="pairs: a prompt and a chosen and a rejected answer per row (text, a message or a list "
        "of messages each: prompt/chosen/rejected columns, ShareGPT conversations/chosen/rejected, OpenAI's "
        "input/preferred_output/non_preferred_output); kto: a conversation whose last answer is marked good "
        "or bad by a true/false label.",
    )
    prompt_column: str = Field(
        default="prompt",
        min_length=1,
        description="Preference: the prompt (text, a list of messages, or an object with messages).",
    )
    chosen_column: str = Field(default="chosen", min_length=1, description="Preference: the better answer.")
    rejected_column: str = Field(
        default="rejected", min_length=1, description="Preference: the worse answer."
    )
    messages_column: str = Field(
        default="messages",
        min_length=1,
        description="KTO: the conversation; its last message is the answer the label judges.",
    )
    label_column: str = Field(
        default="label", min_length=1, description="KTO: true when the answer is good, false when bad."
    )
    template: TemplateName = Field(
        default="auto",
        description="Chat template: auto uses the tokenizer's own and falls back to alpaca when it has none.",
    )
    system_prompt: str | None = Field(
        default=None, max_length=4000, description="A system message put before every prompt that has none."
    )
    continue_from_adapter_id: int | None = Field(
        default=None,
        ge=1,
        description="Start from this supervised adapter (a causal-LM adapter the studio made, of the same base "
        "model and method) instead of a new one; it is also the reference model.",
    )

    def resolved_beta(self) -> float:
        """The beta the loss uses: the one set, or the loss's usual value."""
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]


GpuClass = Literal["16gb", "24gb", "40gb", "48gb", "80gb", "141gb"]
GPU_CLASS_BYTES: dict[str, int] = {name: int(name.removesuffix("gb")) * 10**9 for name in get_args(GpuClass)}


class ResourceSettings(BaseModel):
    """Where the job runs: CPU or GPU, the GPU memory it needs, and how many training processes (DDP)."""

    model_config = ConfigDict(extra="forbid")

    accelerator: Literal["any", "cpu", "gpu"] = Field(
        default="any",
        description="any: the first free worker; cpu: only CPU workers; gpu: only workers with a GPU.",
    )
    gpu_class: GpuClass | None = Field(
        default=None,
        description="Run only on a worker whose GPUs have at least this much memory (implies gpu); "
        "POST /api/v1/jobs/estimate suggests one.",
    )
    num_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Training processes of one job (through torchrun): one per GPU on a GPU "
        "worker, which must have that many; on a CPU they share the cores (gloo backend).",
    )
    strategy: Strategy = Field(
        default="auto",
        description="How several processes share the job: ddp replicates the model on each; fsdp shards "
        "weights, gradients and optimizer state across them (for models that do not fit one GPU; checkpoints "
        "and the adapter are gathered whole); auto: fsdp when the memory estimate does not fit one GPU of the "
        "worker, else ddp. Needs num_processes > 1 for fsdp.",
    )

    @model_validator(mode="after")
    def _gpu_class_needs_gpu(self) -> "ResourceSettings":
        if self.gpu_class and self.accelerator == "cpu":
            raise ValueError("gpu_class asks for a GPU but accelerator is cpu; choose gpu or any")
        if self.strategy == "fsdp" and self.num_processes < 2:
            raise ValueError(
                "strategy fsdp shards the model across processes and needs num_processes of 2 or more "
                f"(it is {self.num_processes}); raise num_processes or choose auto or ddp"
            )
        return self

    @property
    def wants_gpu(self) -> bool:
        """True when the job must run on a GPU worker."""
        return self.accelerator == "gpu" or self.gpu_class is not None


class TrackingSettings(BaseModel):
    """Experiment trackers this job also reports to; all off by default."""

    model_config = ConfigDict(extra="forbid")

    tensorboard: bool = Field(
        default=False, description="Write TensorBoard event files, downloadable from the job page."
    )
    mlflow: bool = Field(
        default=False, description="Log parameters and metrics to MLflow (the worker needs mlflow-skinny)."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        max_length=1000,
        description="MLflow tracking server or store URI; empty writes a local store on the worker, "
        "sqlite:///<data_dir>/mlflow.db. An http(s) server must be public or allow-listed by the admin; "
        "local stores (file://, sqlite://, paths) only in the admin's jobs.",
    )
    mlflow_experiment: str = Field(
        default="peft-studio", min_length=1, max_length=200, description="MLflow experiment name."
    )
    wandb: bool = Field(
        default=False,
        description="Log to Weights & Biases (the worker needs the wandb package and a login or WANDB_API_KEY).",
    )
    wandb_project: str = Field(
        default="peft-studio", min_length=1, max_length=200, description="Weights & Biases project."
    )


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
    task: Task = Field(default=CLASSIFICATION, description="What the model learns to do.")
    dataset_id: int = Field(ge=1, description="The training dataset.")
    text_column: str = Field(
        default="text",
        min_length=1,
        description="Column holding the input text (classification, and the causal-LM plain-text format).",
    )
    label_column: str = Field(
        default="label", min_length=1, description="Column holding the class label (classification only)."
    )
    text_columns: list[str] | None = Field(
        default=None,
        max_length=8,
        description="Classification: several text columns (e.g. title and description) joined, one per line, "
        "into the input; empty uses the text column alone.",
    )
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
    causal_lm: CausalLMSettings = Field(default_factory=CausalLMSettings)
    preference: PreferenceSettings = Field(default_factory=PreferenceSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    # validate_default: the checks across sections below also hold for a spec that leaves resources out
    resources: ResourceSettings = Field(default_factory=ResourceSettings, validate_default=True)

    # Field validators (not one model validator) so that errors name ``method`` and ``method_config.<field>``.
    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str, info: ValidationInfo) -> str:
        methods = registry()
        if method not in methods:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(methods))}")
        task = info.data.get("task")
        if task is not None and task not in methods[method].tasks:
            supported = ", ".join(methods[method].tasks)
            raise ValueError(f"method {method!r} does not support task {task!r}; it supports {supported}")
        return method

    @field_validator("method_config")
    @classmethod
    def _validate_method_config(cls, config: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method not in registry():
            return config  # the method's own error is reported
        settings = registry()[method].config
        known = set(settings.model_fields) | {f.alias for f in settings.model_fields.values() if f.alias}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(map(repr, unknown))} for method {method!r}; "
                f"its settings are: {', '.join(settings.model_fields)}"
            )
        return settings.model_validate(config).model_dump(mode="json")

    # Checks across sections sit on ``resources`` (validated last), so the error names a field, not the body.
    @field_validator("resources")
    @classmethod
    def _resources_fit_the_job(cls, resources: ResourceSettings, info: ValidationInfo) -> ResourceSettings:
        training = info.data.get("training")
        if training is not None and training.optimizer in BNB_OPTIMIZERS and not resources.wants_gpu:
            raise ValueError(
                f"training.optimizer {training.optimizer} is a bitsandbytes 8-bit optimizer for CUDA GPUs; set "
                f"resources.accelerator to gpu (it is {resources.accelerator}) or choose adamw_torch"
            )
        if training is not None and training.attention != "auto":
            if info.data.get("task") != CAUSAL_LM:
                raise ValueError(
                    f"training.attention {training.attention} is for causal-lm jobs (other tasks keep their "
                    "model's attention); choose auto"
                )
            if training.attention == "flex_attention" and not resources.wants_gpu:
                raise ValueError(
                    "training.attention flex_attention has no backward pass on CPUs; set resources.accelerator "
                    f"to gpu (it is {resources.accelerator}) or choose auto"
                )
        method = registry().get(str(info.data.get("method")))
        if resources.strategy == "fsdp" and method is not None and method.saved_as == "studio":
            raise ValueError(
                f"strategy fsdp cannot save method {method.name!r} (a studio adapter, not a peft or "
                "transformers model, so its sharded weights cannot be gathered into one); choose ddp"
            )
        return resources

    def method_settings(self) -> BaseModel:
        """The method config as its typed model."""
        return registry()[self.method].config.model_validate(self.method_config)
