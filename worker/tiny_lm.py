"""A tiny Llama-shaped causal LM with a real trained tokenizer and a chat template, made offline in seconds.

Used by ``peft-studio make-tiny-lm PATH`` (to try the causal-LM path without downloading anything) and by the
tests. The weights are random; the tokenizer is a byte-level BPE trained with the ``tokenizers`` library on
the texts given (any dataset file works), so it encodes any text and round-trips it exactly.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

BOS, EOS, PAD, TURN_START = "<s>", "<|im_end|>", "<pad>", "<|im_start|>"

# ChatML, as Qwen-style instruct models write it: a turn ends with <|im_end|>, which is also the EOS token,
# so a response learned through this template ends at EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough English and template text for a usable tokenizer when no corpus is given.
DEFAULT_CORPUS = [
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1. Eat a balanced diet. "
    "2. Exercise regularly. 3. Sleep well.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
    "France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Translate the following sentence into French: the weather is nice today. Summarize the text below in "
    "one sentence. Write a short poem about the sea. Explain why the sky is blue. List five fruits.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000, . ; : ! ? ' \" ( ) [ ] { } - + = * / # @ & % $",
]


def corpus_from_file(path: Path) -> list[str]:
    """Every string value (and chat message content) of a dataset file, as tokenizer training texts."""
    from app.core.datasets_io import detect_format, load_rows

    _, rows = load_rows(path, detect_format(path.name))
    texts: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str) and value.strip():
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for row in rows:
        collect(row)
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, with BOS/EOS/PAD tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, TURN_START]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*texts, *DEFAULT_CORPUS], trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama: encoding a text with special tokens adds BOS in front (never EOS).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[TURN_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="right",
    )


def make_tiny_lm(
    path: Path,
    texts: Iterable[str] | None = None,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny Llama and its trained tokenizer to ``path`` (transformers folder)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts if texts is not None else [], vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
