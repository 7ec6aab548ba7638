"""Named chat templates, and which template a causal-LM job uses.

A tokenizer that ships a chat template is used with its own; otherwise (or when the job names one) a named
template here. They are Jinja chat templates in the same dialect as ``tokenizer.chat_template``, so training,
the preview and try-out all render through ``tokenizer.apply_chat_template`` and the adapter's saved tokenizer
carries the template it was trained with. Torch-free: the web app reads a model folder's template from its
files without loading the tokenizer.
"""

import json
from pathlib import Path
from typing import Literal

TemplateName = Literal["auto", "alpaca", "chatml", "plain"]

# Alpaca (Taori et al. 2023) as LLaMA-Factory writes it for multi-turn data: a system message replaces the
# preamble; an example's input is part of the user message. The response ends with the EOS token.
ALPACA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] }}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{ 'Below is an instruction that describes a task. '"
    "'Write a response that appropriately completes the request.' }}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '\n\n### Instruction:\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '\n\n### Response:\n' + message['content'] + (eos_token or '') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\n### Response:\n' }}{%- endif -%}"
)

# ChatML (OpenAI; used by Qwen and many others). The turn ends with <|im_end|>; where that is not the
# tokenizer's EOS, training appends EOS after the response so generation still stops.
CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# No markup: the contents one after another (for prompt/completion data that is already formatted).
PLAIN = (
    "{%- for message in messages -%}"
    "{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token or '' }}{%- endif -%}"
    "{%- endfor -%}"
)

NAMED_TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "chatml": CHATML, "plain": PLAIN}
FALLBACK_TEMPLATE = "alpaca"


def tokenizer_chat_template(folder: Path) -> str | None:
    """The chat template a model folder's tokenizer ships (chat_template.jinja or tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # several named templates: the default one
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def resolve_template(choice: str, own_template: str | None) -> tuple[str, str]:
    """The template a job uses, as (name, Jinja source): the tokenizer's own under auto, else a named one."""
    if choice == "auto":
        if own_template:
            return "tokenizer", own_template
        return FALLBACK_TEMPLATE, NAMED_TEMPLATES[FALLBACK_TEMPLATE]
    return choice, NAMED_TEMPLATES[choice]
