"""Every registered method, parametrized over the registry (a new method module gets its rows automatically).

Classification, through the real worker path on the bundled MiniLM: the job trains (loss goes down on a
repeated batch), its counts equal the pre-launch estimate, the saved adapter reloads onto a fresh base with
identical logits, the downloaded archive loads outside the studio (plain peft, plain transformers, or the
``studio_adapters.py`` shipped with our own adapters) and try-out predicts the same probabilities.
Causal LM, at the method level on a tiny random Llama: build, a few Trainer steps, save, reload, same logits.
"""

import importlib.util
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import Session, select

from app.core.base_models import resolve_base_model
from app.core.db import get_engine
from app.core.models import Adapter, Job, JobStatus, MetricPoint
from app.core.settings import BUNDLED_MODEL_ID
from app.core.spec import JobSpec
from app.core.tasks import CAUSAL_LM, CLASSIFICATION
from tests.bnb_paths import CPU_PATHS, FUSED, force_cpu_path, method_params
from tests.factories import create_dataset, create_job, sst2_bytes
from worker.methods import BuildContext, MethodInfo, count_parameters, registry

ROWS = 8  # one batch of 8, repeated every step: the loss must fall on it
STEPS = 6
MAX_LENGTH = 32
TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés"]

# Per-method test settings: a learning rate high enough to see learning in 6 steps, and small configs.
# A method missing here runs with DEFAULT_CASE.
DEFAULT_CASE: dict[str, Any] = {"learning_rate": 1e-3, "method_config": {}}
CASES: dict[str, dict[str, Any]] = {
    "full": {"learning_rate": 1e-4},
    "freeze": {"learning_rate": 5e-4, "method_config": {"k": 1}},
    "llrd": {"learning_rate": 2e-4, "method_config": {"decay": 0.5}},
    "lora": {"learning_rate": 5e-3, "method_config": {"r": 4}},
    "qlora": {"learning_rate": 5e-3, "method_config": {"r": 4, "target_modules": ["query", "value"]}},
    "adalora": {"learning_rate": 5e-3, "method_config": {"init_r": 4, "target_r": 2}},
    "loraplus": {"learning_rate": 1e-3, "method_config": {"r": 4, "lr_ratio": 16}},
    "ia3": {"learning_rate": 3e-2},
    "prefix": {"learning_rate": 3e-2, "method_config": {"num_virtual_tokens": 8}},
    "prompt": {
        "learning_rate": 3e-2,
        "method_config": {"num_virtual_tokens": 8, "init": "text", "init_text": "is this review positive?"},
    },
    "ptuning": {"learning_rate": 1e-2, "method_config": {"num_virtual_tokens": 8, "encoder_hidden_size": 64}},
    "houlsby": {"learning_rate": 5e-3},
    "pfeiffer": {"learning_rate": 5e-3},
    "hadamard": {"learning_rate": 3e-2},
}
CAUSAL_CASES: dict[str, dict[str, Any]] = {
    "prompt": {
        "learning_rate": 3e-2,
        "method_config": {"num_virtual_tokens": 8},
    },  # the tiny LM has no tokenizer
    "qlora": {"learning_rate": 5e-3, "method_config": {"r": 4}},
    "adalora": {"learning_rate": 5e-3, "method_config": {"init_r": 4, "target_r": 2}},
}


def case(name: str, cases: dict[str, dict[str, Any]] = CASES) -> dict[str, Any]:
    return {**DEFAULT_CASE, **cases.get(name, {})}


def methods_for(task: str) -> list[str]:
    return sorted(name for name, info in registry().items() if task in info.tasks)


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def session(studio_settings: Path):
    with Session(get_engine()) as db:
        yield db


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_base_model(BUNDLED_MODEL_ID).path))


def import_studio_loader(folder: Path) -> Any:
    """Import the ``studio_adapters.py`` shipped in a downloaded adapter, as a user would."""
    spec = importlib.util.spec_from_file_location(
        f"studio_adapters_{abs(hash(folder))}", folder / "studio_adapters.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_downloaded(method: MethodInfo, folder: Path, base_path: Path, load_kwargs: dict[str, Any]) -> Any:
    """Load an unzipped adapter archive the way docs/methods.md tells users to, without studio code."""
    from transformers import AutoModelForSequenceClassification

    if method.saved_as == "transformers":
        return AutoModelForSequenceClassification.from_pretrained(folder)
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2, **load_kwargs)
    if method.saved_as == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, folder)
    return import_studio_loader(folder).load_adapter(base, folder)


def check_method_specifics(name: str, model: Any, optimizer: Any, learning_rate: float, config: dict) -> None:
    """What a method promises beyond training: 4-bit weights, LoRA+ rates, LLRD depths, AdaLoRA ranks."""
    if name == "qlora":
        import bitsandbytes as bnb

        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers, "QLoRA must put 4-bit bitsandbytes layers in the base"
        heads = [m for n, m in model.named_modules() if n.endswith("classifier.modules_to_save.default")]
        assert heads and all(type(m) is torch.nn.Linear for m in heads), "the new head must stay unquantized"
    if name == "loraplus":
        names = {id(param): param_name for param_name, param in model.named_parameters()}
        rates: dict[str, set[float]] = {"lora_A": set(), "lora_B": set()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                kind = next((k for k in rates if k in names[id(param)]), None)
                if kind:
                    rates[kind].add(group["lr"])
        assert rates == {"lora_A": {learning_rate}, "lora_B": {learning_rate * config["lr_ratio"]}}
    if name == "llrd":
        by_depth = {group["depth"]: group["lr"] for group in optimizer.param_groups}
        assert by_depth == {d: pytest.approx(learning_rate * config["decay"] ** d) for d in range(8)}
    if name == "adalora":
        assert model.peft_config["default"].rank_pattern, "the budget callback must have allocated ranks"


@pytest.mark.parametrize(("name", "cpu_path"), method_params(methods_for(CLASSIFICATION)))
def test_method_trains_reloads_downloads_and_predicts(
    name: str,
    cpu_path: str | None,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    minilm_tokenizer: Any,
) -> None:
    from worker import engine, training
    from worker.estimate import estimate_job
    from worker.inference import classify
    from worker.recipes import get_recipe

    # given 16 SST-2 rows trained as one repeated batch (QLoRA: on each bitsandbytes CPU path)
    if cpu_path:
        force_cpu_path(cpu_path, monkeypatch)
    method = registry()[name]
    test_case = case(name)
    dataset = create_dataset(session, sst2_bytes(ROWS + 1))
    job = create_job(
        session,
        dataset_id=dataset.id,
        method=name,
        method_config=test_case["method_config"],
        validation_fraction=1 / (ROWS + 1),  # one row held out; never evaluated (eval_steps > max_steps)
        training={
            "max_steps": STEPS,
            "batch_size": ROWS,
            "learning_rate": test_case["learning_rate"],
            "logging_steps": 1,
            "eval_steps": 1000,
            "max_length": MAX_LENGTH,
            "warmup_ratio": 0,
            "lr_scheduler": "constant",
        },
    )
    spec = JobSpec.model_validate(job.spec)
    built: dict[str, Any] = {}
    real_build = training.build_trainable

    def spy(spec_: JobSpec, *rest: Any) -> Any:
        result = real_build(spec_, *rest)
        built.update(model=result[2], optimizer=result[3])
        return result

    monkeypatch.setattr(training, "build_trainable", spy)
    # A cold try-out cache: adapter ids restart at 1 in every test's fresh database.
    from worker import inference

    monkeypatch.setattr(inference, "WARM", inference.WarmModels())

    # when the worker runs the job
    engine.run_job(job.id)

    # then it succeeded and learned
    session.expire_all()
    finished = session.get(Job, job.id)
    assert finished is not None and finished.status == JobStatus.succeeded, finished and finished.error
    points = session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id)).all()
    train = sorted((p for p in points if p.split == "train" and "loss" in p.values), key=lambda p: p.step)
    losses = [p.values["loss"] for p in train]
    assert len(losses) >= STEPS - 1 and losses[-1] < losses[0], losses
    model, optimizer = built["model"], built["optimizer"]
    check_method_specifics(name, model, optimizer, test_case["learning_rate"], test_case["method_config"])

    # and the recorded counts are exactly the pre-launch estimate
    adapter = session.exec(select(Adapter).where(Adapter.job_id == job.id)).one()
    estimate = estimate_job(spec, dataset.profile)
    assert (adapter.trainable_params, adapter.total_params) == (
        estimate.trainable_params,
        estimate.total_params,
    )
    assert adapter.method == name and 0 < adapter.trainable_params <= adapter.total_params

    # and the saved adapter reloads onto a fresh base with identical logits
    model.eval()
    batch = minilm_tokenizer(TEXTS, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = model(**batch).logits
    from worker.training import STUDIO_FILE

    folder = engine.get_store().path(adapter.storage_key)
    studio = json.loads((folder / STUDIO_FILE).read_text())
    assert studio["method"] == name
    base = resolve_base_model(BUNDLED_MODEL_ID)
    settings = method.config.model_validate(test_case["method_config"])
    load_kwargs = method.load_kwargs(settings, BuildContext(task=CLASSIFICATION))
    fresh = get_recipe(CLASSIFICATION).load_base(base, studio, load_kwargs)
    reloaded = method.load(fresh, str(folder), "reloaded").eval()
    with torch.no_grad():
        assert_same_logits(reloaded(**batch).logits, trained)
        if cpu_path:  # a save after the eval forward (a repack on the fused path) changes nothing
            method.save(model, str(tmp_path / "again"))
            assert_same_logits(model(**batch).logits, trained)

    # and the downloaded archive loads outside the studio
    from app.services.adapters import build_archive

    archive = build_archive(adapter)
    unpacked = tmp_path / "download"
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(unpacked)
    archive.unlink()
    downloaded = load_downloaded(method, unpacked, base.path, load_kwargs).eval()
    with torch.no_grad():
        outside = downloaded(**batch).logits
    if cpu_path == FUSED:
        # Outside the studio, plain peft + bitsandbytes on such a CPU run the fused kernel (bf16 products, bf16
        # scales: 8 significant bits), the studio the dequantizing one. Each of the k 4-bit layers on the path
        # rounds once at 2^-8 relative, so the logits may differ by up to k * 2^-8 of their largest magnitude.
        layers = sum(1 for m in downloaded.modules() if type(m).__name__ == "Linear4bit")
        bound = layers * 2**-8 * float(trained.abs().max())
        torch.testing.assert_close(outside, trained, rtol=0, atol=bound)
        assert torch.equal(outside.argmax(-1), trained.argmax(-1))
    else:
        assert_same_logits(outside, trained)

    # and try-out predicts the trained model's probabilities
    predictions = classify(adapter.id, folder, TEXTS)
    expected = torch.softmax(trained, dim=-1)
    for prediction, row in zip(predictions, expected, strict=True):
        assert [prediction["probabilities"][label] for label in ("0", "1")] == pytest.approx(
            row.tolist(), abs=1e-5
        )


# --- causal LM, at the method level ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with hidden size 32 and a 256-token vocabulary, random weights, saved to a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("name", "cpu_path"), method_params(methods_for(CAUSAL_LM)))
def test_method_on_a_causal_lm(
    name: str, cpu_path: str | None, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from worker.estimate import estimate

    # given the method applied to a tiny random Llama (QLoRA: on each bitsandbytes CPU path; its 32-wide
    # layers are narrower than the 64-wide quantization block, which the fused path cannot repack)
    if cpu_path:
        force_cpu_path(cpu_path, monkeypatch)
    method = registry()[name]
    test_case = case(name, {**CASES, **CAUSAL_CASES})
    settings = method.config.model_validate(test_case["method_config"])
    lr = test_case["learning_rate"]
    context = BuildContext(
        task=CAUSAL_LM, learning_rate=lr, total_steps=STEPS, base_model_path=str(tiny_llama)
    )
    load_kwargs = method.load_kwargs(settings, context)
    torch.manual_seed(0)
    built = method.build(AutoModelForCausalLM.from_pretrained(tiny_llama, **load_kwargs), settings, context)
    model = built.model
    expected = estimate(
        str(tiny_llama),
        CAUSAL_LM,
        method,
        settings,
        num_labels=None,
        batch_size=8,
        max_length=16,
        total_steps=STEPS,
    )
    assert count_parameters(model) == (expected.trainable_params, expected.total_params)

    # when it trains a few steps on one repeated batch of random tokens
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 256, (8, 16), generator=generator)
    rows = [{"input_ids": row, "labels": row} for row in tokens]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    optimizer = built.optimizer_factory(model) if built.optimizer_factory else None
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, callbacks=built.callbacks, optimizers=(optimizer, None)
    )
    trainer.train()

    # then the loss went down
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0], losses

    # and save → reload onto a fresh base gives identical logits
    model.eval()
    probe = tokens[:2]
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    if cpu_path == FUSED:
        check_no_repack(model)
    saved = tmp_path / "saved"
    method.save(model, str(saved))
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, **load_kwargs)
    reloaded = method.load(fresh, str(saved), "reloaded").eval()
    with torch.no_grad():
        assert_same_logits(reloaded(input_ids=probe).logits, trained)
        assert_same_logits(model(input_ids=probe).logits, trained)  # saving left the trained model as it was


def check_no_repack(model: Any) -> None:
    """On the fused path, the studio's trained model was not repacked by the eval forward: training (and the
    studio's reload) keep the dequantizing kernel, the only one with a backward."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    packed = [bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers]
    assert layers and not any(packed), packed


def test_registry_is_complete_and_documented() -> None:
    expected = {
        "full",
        "freeze",
        "llrd",
        "lora",
        "qlora",
        "adalora",
        "loraplus",
        "ia3",
        "prefix",
        "prompt",
        "ptuning",
        "houlsby",
        "pfeiffer",
        "hadamard",
    }
    methods = registry()
    assert expected <= set(methods)
    docs = (Path(__file__).parents[1] / "docs" / "methods.md").read_text(encoding="utf-8")
    for name, info in methods.items():
        assert info.paper and info.summary and info.tasks and info.learning_rate > 0
        for field_name, field in info.config.model_fields.items():
            assert field.description, f"{name}.{field_name} needs a description: the form shows it as help"
            assert f"`{field_name}`" in docs, f"docs/methods.md must name setting {field_name!r} of {name!r}"
        assert f"`{name}`" in docs, f"docs/methods.md must describe method {name!r}"


@pytest.mark.parametrize("cpu_path", CPU_PATHS)
def test_4bit_layers_survive_saving_on_each_cpu_path(cpu_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A narrow 4-bit layer runs, and ``state_dict()`` of a repacked layer leaves its outputs unchanged."""
    import bitsandbytes as bnb

    from worker.methods.qlora import guard_4bit_layers

    # given a model with a layer the fused kernel can take (128 -> 64) and one it cannot (32 -> 48)
    force_cpu_path(cpu_path, monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4"),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 32),
        bnb.nn.Linear4bit(32, 48, compute_dtype=torch.float32, quant_type="nf4"),
    )
    for layer in (model[0], model[3]):  # quantize now, as from_pretrained does
        layer.weight._quantize("cpu")
    model.eval()
    kept = guard_4bit_layers(model)
    x = torch.randn(4, 128)

    # when it runs, is saved, and runs again
    with torch.no_grad():
        before = model(x)
        state = model.state_dict()
        after = model(x)

    # then nothing crashed, the outputs are the same, and the saved weights are the unpacked 4-bit layout
    assert kept == (1 if cpu_path == FUSED else 0)
    assert getattr(model[0].weight.quant_state, "packing_format_for_cpu", False) == (cpu_path == FUSED)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert (
        state["0.weight"].shape == model[0].weight.quant_state.original_qshape if cpu_path == FUSED else True
    )


@pytest.mark.parametrize("cpu_path", CPU_PATHS)
def test_training_goes_on_after_an_evaluation_on_each_cpu_path(
    cpu_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QLoRA job evaluates in the middle of training: the eval forward must not switch the 4-bit layers to
    the fused inference kernel for the training steps after it (on AVX-512 BF16 CPUs that step crashed)."""
    import bitsandbytes as bnb

    from worker.methods.qlora import guard_4bit_layers

    # given a trainable layer on top of a 4-bit layer with a bias, guarded for training
    force_cpu_path(cpu_path, monkeypatch)
    torch.manual_seed(0)
    frozen = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    frozen.weight._quantize("cpu")
    frozen.bias.requires_grad_(False)
    head = torch.nn.Linear(64, 2)
    model = torch.nn.Sequential(frozen, torch.nn.ReLU(), head)
    guard_4bit_layers(model, training=True)
    x = torch.randn(4, 128, requires_grad=True)  # as after prepare_model_for_kbit_training

    # when an evaluation runs, then training goes on
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 128))
    model.train()
    loss = model(x).pow(2).mean()
    loss.backward()

    # then the 4-bit layer was never repacked and the gradient reached the trainable layer
    assert not getattr(frozen.weight.quant_state, "packing_format_for_cpu", False)
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_emulated_fused_kernel_matches() -> None:
    """The fused-path emulation (used on CPUs without AVX-512 BF16) computes what the fused kernel does."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as functional

    from tests.bnb_paths import emulated_fused_gemv, host_has_avx512bf16

    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    quantized, state = functional.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    x = torch.randn(8, 256)
    reference = x @ functional.dequantize_4bit(quantized, state).T  # the dequantizing path, fp32
    packed, packed_state = functional._convert_weight_packed_for_cpu(quantized.clone(), copy_state(state))
    emulated = emulated_fused_gemv(functional.gemv_4bit)(x, packed, state=packed_state)
    # bf16 has an 8-bit mantissa: inputs, weights and scales each carry up to 2^-9 relative rounding
    torch.testing.assert_close(emulated, reference, rtol=0.03, atol=0.03 * reference.abs().max().item())
    if host_has_avx512bf16():
        real = bnb.matmul_4bit(x, torch.nn.Parameter(packed, requires_grad=False), quant_state=packed_state)
        # both round the output to bf16 (eps 2^-7); summation order may flip a rounding: two ulps of the
        # largest output, since values near zero come from cancelling sums of that size
        ulp = 2**-7 * real.abs().max().item()
        torch.testing.assert_close(emulated, real, rtol=2**-7, atol=2 * ulp)


def copy_state(state: Any) -> Any:
    """A copy of a QuantState whose fields the repack may reassign."""
    import copy

    duplicate = copy.copy(state)
    duplicate.absmax = state.absmax.clone()
    return duplicate


# --- placement, parameter counts and variants, against the papers, on a tiny BERT (no training data) -------

D, FF, LAYERS, LABELS = 32, 64, 2, 2  # hidden size, feed-forward size, layers, labels of the tiny BERT
CLASSIFIER = D * LABELS + LABELS  # the new head: Linear(d, labels)
LAYER_NORMS = 2 * D + LAYERS * 2 * (2 * D)  # embeddings' LayerNorm, and two per layer (weight and bias each)


def tiny_bert(folder: Path | None = None) -> Any:
    """A 2-layer BERT classifier (hidden 32, feed-forward 64), random weights; saved to ``folder`` if given."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        max_position_embeddings=64,
        num_labels=LABELS,
    )
    model = BertForSequenceClassification(config)
    if folder is not None:
        model.save_pretrained(folder)
    return model


def build_on_tiny_bert(name: str, method_config: dict[str, Any], model: Any = None) -> Any:
    method = registry()[name]
    settings = method.config.model_validate(method_config)
    context = BuildContext(task=CLASSIFICATION, num_labels=LABELS, total_steps=10)
    return method.build(model if model is not None else tiny_bert(), settings, context)


def layer_modules(suffix: str) -> set[str]:
    """``suffix`` (e.g. ``attention.self.key``) in every layer of the tiny BERT, by qualified name."""
    return {f"bert.encoder.layer.{i}.{suffix}" for i in range(LAYERS)}


def modules_with(model: Any, child: str) -> set[str]:
    """Qualified names (peft's ``base_model.model.`` prefix removed) of the modules that have ``child``."""
    found = set()
    for name, module in model.named_modules():
        if hasattr(module, child) and not name.endswith(child):
            found.add(name.removeprefix("base_model.model."))
    return found


def adapter_sites(model: Any) -> set[str]:
    from worker.methods._adapter_layers import CHILD

    return {name for name, module in model.named_modules() if hasattr(module, CHILD) and CHILD not in name}


def trainable_names(model: Any) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def bottleneck(d: int, reduction: int = 16) -> int:
    """Houlsby et al.'s count for one adapter: down (d*m + m) and up (m*d + d), m = d / reduction."""
    m = d // reduction
    return 2 * d * m + d + m


# name, settings, where the paper puts the method, trainable count by the paper's formula
PLACEMENTS: list[tuple[str, dict[str, Any], set[str], int]] = [
    # LoRA: B·A (r×in, out×r) beside each targeted linear layer; the head trains in full
    (
        "lora",
        {"r": 4, "target_modules": ["query", "value"]},
        layer_modules("attention.self.query") | layer_modules("attention.self.value"),
        LAYERS * 2 * 4 * (D + D) + CLASSIFIER,
    ),
    # DoRA: LoRA plus one magnitude per output feature of each adapted layer
    (
        "lora",
        {"r": 4, "target_modules": ["query", "value"], "use_dora": True},
        layer_modules("attention.self.query") | layer_modules("attention.self.value"),
        LAYERS * 2 * (4 * (D + D) + D) + CLASSIFIER,
    ),
    # Houlsby: after the attention block and after the FFN of every layer; layer norms train (the paper's)
    (
        "houlsby",
        {},
        layer_modules("attention.output.dense") | layer_modules("output.dense"),
        LAYERS * 2 * bottleneck(D) + LAYER_NORMS + CLASSIFIER,
    ),
    (
        "houlsby",
        {"train_layer_norm": False},
        layer_modules("attention.output.dense") | layer_modules("output.dense"),
        LAYERS * 2 * bottleneck(D) + CLASSIFIER,
    ),
    # Pfeiffer: after the FFN only; only adapters (and head) train
    ("pfeiffer", {}, layer_modules("output.dense"), LAYERS * bottleneck(D) + CLASSIFIER),
    # Hadamard: w ⊙ x + b after the attention output, norms and head train (the paper's)
    ("hadamard", {}, layer_modules("attention.output.dense"), LAYERS * 2 * D + LAYER_NORMS + CLASSIFIER),
    (
        "hadamard",
        {"train_layer_norm": False, "classifier_first_fraction": 0},
        layer_modules("attention.output.dense"),
        LAYERS * 2 * D + CLASSIFIER,
    ),
]


@pytest.mark.parametrize(("name", "config", "sites", "count"), PLACEMENTS)
def test_placement_and_count_follow_the_paper(name: str, config: dict, sites: set[str], count: int) -> None:
    # given the method built on a tiny BERT
    model = build_on_tiny_bert(name, config).model

    # then its layers sit where the paper puts them, and nowhere else
    if registry()[name].saved_as == "studio":
        assert adapter_sites(model) == sites
    else:
        assert modules_with(model, "lora_A") == sites
    # and the trainable parameters are the formula's count, made of what the paper trains
    assert count_parameters(model)[0] == count
    names = trainable_names(model)
    norms = {n for n in names if "LayerNorm" in n}
    assert bool(norms) == bool(config.get("train_layer_norm", name in ("houlsby", "hadamard")))
    assert {n for n in names if "classifier" in n}, "the new head must train"


def test_ia3_rescales_keys_values_and_the_feed_forward() -> None:
    # given IA3 with peft's default targets for BERT
    model = build_on_tiny_bert("ia3", {}).model

    # then (Liu et al. 2022) keys and values are rescaled at their output, the feed-forward's output layer at its
    # input (the intermediate activation): k + v + ff vectors per layer
    sites = modules_with(model, "ia3_l")
    assert layer_modules("attention.self.key") <= sites
    assert layer_modules("attention.self.value") <= sites
    assert layer_modules("output.dense") <= sites
    assert not any("query" in s or "intermediate" in s for s in sites)
    feed_forward = {s for s in sites if s.endswith("output.dense") and "attention" not in s}
    vectors = {n: p.numel() for n, p in model.named_parameters() if "ia3_l" in n}
    ff_sizes = {
        n: v for n, v in vectors.items() if any(n.startswith(f"base_model.model.{s}.") for s in feed_forward)
    }
    assert sorted(set(ff_sizes.values())) == [FF]
    extra = sites - layer_modules("attention.self.key") - layer_modules("attention.self.value") - feed_forward
    # peft's default for BERT also matches "output.dense" in the attention block (docs/methods.md says so)
    assert extra <= layer_modules("attention.output.dense")
    expected = LAYERS * (D + D + FF) + D * len(extra) + CLASSIFIER
    assert count_parameters(model)[0] == expected


@pytest.mark.parametrize(
    ("name", "config", "count"),
    [
        # prompt tuning: n virtual token embeddings at the input
        ("prompt", {"num_virtual_tokens": 4}, 4 * D + CLASSIFIER),
        # prefix tuning (no reparametrization): n key and n value vectors in every layer
        ("prefix", {"num_virtual_tokens": 4}, 4 * LAYERS * 2 * D + CLASSIFIER),
    ],
)
def test_virtual_tokens(name: str, config: dict, count: int) -> None:
    model = build_on_tiny_bert(name, config).model
    assert model.peft_config["default"].num_virtual_tokens == 4
    assert count_parameters(model)[0] == count
    # the base stays frozen: only the virtual tokens and the head train
    base = {n for n in trainable_names(model) if "prompt_encoder" not in n and "classifier" not in n}
    assert not base, base
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (1, LABELS)


def test_rslora_scales_by_the_square_root_of_the_rank() -> None:
    model = build_on_tiny_bert(
        "lora", {"r": 4, "alpha": 8, "target_modules": ["query"], "use_rslora": True}
    ).model
    scalings = {
        m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")
    }
    assert scalings and all(s == pytest.approx(8 / 4**0.5) for s in scalings)  # 4.0, where LoRA's is 8 / 4


VARIANT_LR = 1e-2  # one learning rate for every variant below (no per-method tuning)


def train_briefly(model: Any, steps: int = 6) -> list[float]:
    """``steps`` AdamW steps on one fixed batch; the losses."""
    torch.manual_seed(1)
    ids = torch.randint(5, 100, (8, 12))
    labels = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=VARIANT_LR)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("lora", {"r": 4, "target_modules": ["query", "value"], "use_dora": True}),
        ("lora", {"r": 4, "target_modules": ["query", "value"], "use_rslora": True}),
        ("houlsby", {"train_layer_norm": False}),
        ("pfeiffer", {"train_layer_norm": True}),
        ("hadamard", {"train_layer_norm": False, "classifier_first_fraction": 0}),
    ],
)
def test_variant_trains(name: str, config: dict) -> None:
    # given a variant built on the tiny BERT; when it trains six steps on one batch at the shared rate
    model = build_on_tiny_bert(name, config).model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_briefly(model)
    # then the loss fell and every kind of trainable tensor moved in some layer (the method's own ones included;
    # not each one: a tiny bottleneck's ReLU units may be dead on this batch in one layer)
    assert losses[-1] < losses[0], losses
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    kinds = {re.sub(r"\.\d+\.", ".N.", n) for n in before}
    assert kinds == {re.sub(r"\.\d+\.", ".N.", n) for n in moved}, sorted(set(before) - moved)[:5]


def test_qlora_8bit_trains_on_cpu(tmp_path: Path) -> None:
    # given 8-bit QLoRA (LLM.int8 base weights, bitsandbytes 0.50 on CPU) on the saved tiny BERT
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification

    tiny_bert(tmp_path)
    method = registry()["qlora"]
    settings = method.config.model_validate({"r": 4, "bits": 8, "target_modules": ["query", "value"]})
    context = BuildContext(task=CLASSIFICATION, num_labels=LABELS, total_steps=10)
    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, **method.load_kwargs(settings, context)
    )
    model = method.build(base, settings, context).model
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()), "the base must be 8-bit"
    # when it trains; then the loss falls at the shared rate
    losses = train_briefly(model)
    assert losses[-1] < losses[0], losses


def test_hadamard_trains_the_head_alone_first() -> None:
    # given the paper's recipe: 30% of 10 steps train only the head
    built = build_on_tiny_bert("hadamard", {})
    model, (callback,) = built.model, built.callbacks
    head = {n for n in trainable_names(model) if "classifier" in n}
    state = type("State", (), {"global_step": 0, "max_steps": 10})()
    ids = torch.tensor([[5, 6, 7, 8]])

    def grads_in_step(step: int) -> set[str]:
        state.global_step = step
        callback.on_step_begin(None, state, None, model=model)
        model(input_ids=ids, labels=torch.tensor([1])).loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        callback.on_step_end(None, state, None, model=model)
        model.zero_grad(set_to_none=True)
        return with_grad

    trainable = trainable_names(model)
    # then in steps 0-2 only the head gets gradients (the optimizer skips the rest), from step 3 everything
    assert grads_in_step(0) == head
    assert grads_in_step(2) == head
    assert trainable_names(model) == trainable  # between steps: the same set, for checkpoints and counts
    assert grads_in_step(3) == trainable


def test_studio_adapter_missing_tensors_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from worker.methods._adapter_layers import WEIGHTS_FILE, load_adapter

    # given a saved Houlsby adapter, and copies of it missing one adapter tensor / the trained head
    built = build_on_tiny_bert("houlsby", {})
    registry()["houlsby"].save(built.model, str(tmp_path / "whole"))
    tensors = load_file(str(tmp_path / "whole" / WEIGHTS_FILE))
    assert load_adapter(tiny_bert(), tmp_path / "whole")  # the whole one loads
    for missing in (
        "bert.encoder.layer.1.output.dense.studio_adapter.up.weight",
        "classifier.weight",
    ):
        folder = tmp_path / missing
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes(
            (tmp_path / "whole" / "adapter_config.json").read_bytes()
        )
        save_file({k: v for k, v in tensors.items() if k != missing}, str(folder / WEIGHTS_FILE))
        # then loading it is refused, naming the tensor, instead of leaving an identity adapter / random head
        with pytest.raises(ValueError, match="lacks 1 tensor"):
            load_adapter(tiny_bert(), folder)
