"""Causal-LM dataset formats: dataset rows into conversations, and conversations into prompt/response text.

Torch-free, shared by the web app (validation, preview) and the worker (training), so both read a row the
same way. A row becomes either a conversation (a list of ``{role, content}`` messages: Alpaca,
prompt/completion and chat data) or a plain text (continued pre-training). A conversation is rendered by a
chat template into segments of text, each marked as trained (assistant responses) or not (everything else);
the template itself is passed in as a function, so this module needs no tokenizer.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app.core.errors import InvalidDataset
from app.core.spec import CausalLMSettings, PreferenceSettings

Message = dict[str, str]
# render(messages, add_generation_prompt) -> the template's text
Render = Callable[[list[Message], bool], str]

ROLES = ("system", "user", "assistant")
# ShareGPT-style messages ({"from": "human", "value": ...}) are read too.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}


@dataclass(frozen=True)
class Example:
    """One training example: a conversation, or a plain text when ``messages`` is None."""

    messages: list[Message] | None = None
    text: str | None = None


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``trained`` pieces carry the loss, the others are masked."""

    text: str
    trained: bool


def required_columns(settings: CausalLMSettings, text_column: str) -> dict[str, str]:
    """The dataset columns a format needs, by spec field name (``causal_lm.output_column``: ``output``)."""
    by_format: dict[str, dict[str, str]] = {
        "alpaca": {
            "causal_lm.instruction_column": settings.instruction_column,
            "causal_lm.output_column": settings.output_column,
        },
        "prompt-completion": {
            "causal_lm.prompt_column": settings.prompt_column,
            "causal_lm.completion_column": settings.completion_column,
        },
        "chat": {"causal_lm.messages_column": settings.messages_column},
        "text": {"text_column": text_column},
    }
    columns = dict(by_format[settings.format])
    if settings.format == "alpaca" and settings.input_column:
        columns["causal_lm.input_column"] = settings.input_column
    return columns


def _text(row: Mapping[str, Any], column: str, number: int, required: bool = True) -> str:
    value = row.get(column)
    if value is None or value == "":
        if required:
            raise InvalidDataset(f"Row {number}: column {column!r} is empty.", row=number)
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InvalidDataset(
            f"Row {number}: column {column!r} holds a {type(value).__name__}, not text.", row=number
        )
    return value


def _messages(value: Any, column: str, number: int) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise InvalidDataset(
            f"Row {number}: column {column!r} must be a non-empty list of {{role, content}} messages; "
            f"it holds {type(value).__name__ if value not in (None, '') else 'nothing'}.",
            row=number,
        )
    messages: list[Message] = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise InvalidDataset(
                f"Row {number}, message {index}: a {type(item).__name__}, not a {{role, content}} object.",
                row=number,
            )
        role = item.get("role", item.get("from"))
        content = item.get("content", item.get("value"))
        role = _ROLE_ALIASES.get(str(role), role)
        if role not in ROLES:
            raise InvalidDataset(
                f"Row {number}, message {index}: role {role!r} is not one of {', '.join(ROLES)}.", row=number
            )
        if not isinstance(content, str):
            raise InvalidDataset(f"Row {number}, message {index}: content must be text.", row=number)
        messages.append({"role": role, "content": content})
    return messages


def example_from_row(
    row: Mapping[str, Any], settings: CausalLMSettings, text_column: str, number: int
) -> Example:
    """The example a row holds in the job's format; InvalidDataset names the row and what is wrong."""
    fmt = settings.format
    if fmt == "text":
        return Example(text=_text(row, text_column, number))
    if fmt == "alpaca":
        instruction = _text(row, settings.instruction_column, number)
        extra = _text(row, settings.input_column, number, required=False) if settings.input_column else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row, settings.output_column, number)},
        ]
    elif fmt == "prompt-completion":
        messages = [
            {"role": "user", "content": _text(row, settings.prompt_column, number)},
            {"role": "assistant", "content": _text(row, settings.completion_column, number)},
        ]
    else:
        messages = _messages(row.get(settings.messages_column), settings.messages_column, number)
        if not any(message["role"] == "assistant" for message in messages):
            raise InvalidDataset(
                f"Row {number}: the conversation has no assistant message to learn.", row=number
            )
    if settings.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": settings.system_prompt})
    return Example(messages=messages)


@dataclass(frozen=True)
class GenerationSettings:
    """What try-out sends: the prompt and how to sample the response."""

    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    use_adapter: bool = True
    seed: int | None = None


def prompt_messages(prompt: str, system_prompt: str | None = None) -> list[Message]:
    """The conversation try-out sends for a prompt typed into the page."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": prompt}]


def _end_at_eos(text: str, eos_token: str | None) -> tuple[str, str]:
    """A response that ends with the EOS token, and the text after it (a newline), which is not learned.

    Templates whose turns end with EOS (ChatML with <|im_end|> as EOS, Llama 3 with <|eot_id|>) are kept as
    they are; for others EOS is added after the response, so a trained model always stops by itself.
    """
    if not eos_token:
        return text, ""
    stripped = text.rstrip()
    if stripped.endswith(eos_token):
        return stripped, text[len(stripped) :]
    return stripped + eos_token, text[len(stripped) :]


def render_segments(
    messages: list[Message], render: Render, eos_token: str | None, train_on_prompt: bool = False
) -> list[Segment]:
    """The conversation as the template writes it, split into masked prompt and trained response segments.

    Each assistant turn is found by rendering the conversation up to it with the generation prompt (the
    prompt) and up to and including it (prompt + response); a template for which these do not extend one
    another cannot mark responses, and is reported as such.
    """
    segments: list[Segment] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], True)
        full = render(messages[: index + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InvalidDataset(
                "The chat template does not render a conversation as prompt followed by response (the text "
                f"up to assistant message {index + 1} does not extend the text before it); choose a named "
                "template."
            )
        response, rest = _end_at_eos(full[len(prompt) :], eos_token)
        segments += [Segment(prompt[len(done) :], train_on_prompt), Segment(response, True)]
        if rest:
            segments.append(Segment(rest, train_on_prompt))
        done = full
    whole = render(messages, False)
    if not whole.startswith(done):
        raise InvalidDataset("The chat template renders the whole conversation differently from its turns.")
    if whole[len(done) :]:
        segments.append(Segment(whole[len(done) :], train_on_prompt))
    return [segment for segment in segments if segment.text]


def prompt_and_response(messages: list[Message], render: Render, eos_token: str | None) -> tuple[str, str]:
    """The prompt (everything before the last response) and the last response, as the template writes them."""
    segments = render_segments(messages, render, eos_token)
    last = max(index for index, segment in enumerate(segments) if segment.trained)
    return "".join(segment.text for segment in segments[:last]), segments[last].text


# Preference data (task ``preference``): a prompt with a chosen and a rejected answer, or (KTO) a conversation whose
# last answer is labelled good or bad. Each value may be text, one message object or a list of messages, so
# prompt/chosen/rejected columns, ShareGPT ``conversations``/``chosen``/``rejected`` objects and OpenAI's
# ``input``/``preferred_output``/``non_preferred_output`` are the same format with other column names.


@dataclass(frozen=True)
class PreferenceExample:
    """One preference example: the prompt conversation and either two answers (chosen, rejected) or, for KTO, one
    answer with its label (``completion``, ``desirable``)."""

    prompt: list[Message]
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None
    completion: list[Message] | None = None
    desirable: bool | None = None


def preference_columns(settings: PreferenceSettings) -> dict[str, str]:
    """The dataset columns a preference format needs, by spec field name."""
    if settings.format == "kto":
        return {
            "preference.messages_column": settings.messages_column,
            "preference.label_column": settings.label_column,
        }
    return {
        "preference.prompt_column": settings.prompt_column,
        "preference.chosen_column": settings.chosen_column,
        "preference.rejected_column": settings.rejected_column,
    }


def _prompt_messages(value: Any, column: str, number: int) -> list[Message]:
    if isinstance(value, dict) and "messages" in value:  # OpenAI's input: {"messages": [...], "tools": ...}
        value = value["messages"]
    if isinstance(value, str):
        if not value.strip():
            raise InvalidDataset(f"Row {number}: column {column!r} (the prompt) is empty.", row=number)
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value, column, number)
    if messages[-1]["role"] == "assistant":
        raise InvalidDataset(
            f"Row {number}: the prompt in column {column!r} ends with an assistant message; it should end with "
            "the user's turn that the chosen and rejected answers reply to.",
            row=number,
        )
    return messages


def _answer_messages(value: Any, column: str, number: int) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise InvalidDataset(f"Row {number}: column {column!r} (an answer) is empty.", row=number)
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value, column, number)
    if messages[-1]["role"] != "assistant":
        raise InvalidDataset(
            f"Row {number}: the answer in column {column!r} must end with an assistant message, not "
            f"{messages[-1]['role']!r}.",
            row=number,
        )
    return messages


def _kto_label(value: Any, column: str, number: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidDataset(
        f"Row {number}: column {column!r} must be true or false (is the answer good?), not {value!r}.",
        row=number,
    )


def preference_example_from_row(
    row: Mapping[str, Any], settings: PreferenceSettings, number: int
) -> PreferenceExample:
    """The preference example a row holds; InvalidDataset names the row, the column and what is wrong."""
    for column in preference_columns(settings).values():
        if column not in row:
            raise InvalidDataset(f"Row {number}: column {column!r} is missing.", row=number)
    if settings.format == "kto":
        conversation = _messages(row.get(settings.messages_column), settings.messages_column, number)
        if conversation[-1]["role"] != "assistant" or len(conversation) < 2:
            raise InvalidDataset(
                f"Row {number}: the conversation in column {settings.messages_column!r} must end with the "
                "assistant answer that the label judges, after at least one prompt message.",
                row=number,
            )
        desirable = _kto_label(row.get(settings.label_column), settings.label_column, number)
        prompt, completion = conversation[:-1], conversation[-1:]
        return PreferenceExample(
            prompt=_with_system(prompt, settings), completion=completion, desirable=desirable
        )
    prompt = _prompt_messages(row.get(settings.prompt_column), settings.prompt_column, number)
    chosen = _answer_messages(row.get(settings.chosen_column), settings.chosen_column, number)
    rejected = _answer_messages(row.get(settings.rejected_column), settings.rejected_column, number)
    if chosen == rejected:
        raise InvalidDataset(
            f"Row {number}: the chosen answer ({settings.chosen_column!r}) and the rejected answer "
            f"({settings.rejected_column!r}) are the same; a preference pair needs two different answers.",
            row=number,
        )
    return PreferenceExample(prompt=_with_system(prompt, settings), chosen=chosen, rejected=rejected)


def _with_system(prompt: list[Message], settings: PreferenceSettings) -> list[Message]:
    if settings.system_prompt and prompt[0]["role"] != "system":
        return [{"role": "system", "content": settings.system_prompt}, *prompt]
    return prompt


def render_preference(
    prompt: list[Message], answer: list[Message], render: Render, eos_token: str | None
) -> tuple[str, str]:
    """The prompt (chat template applied, up to the generation prompt) and the answer as the model writes it
    (ending with EOS), for one answer of a preference example."""
    return prompt_and_response([*prompt, *answer], render, eos_token)
