"""Dataset formats to conversations, and conversations to masked prompt / trained response (no torch)."""

from pathlib import Path
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.core.chat_templates import ALPACA, CHATML, NAMED_TEMPLATES, resolve_template, tokenizer_chat_template
from app.core.errors import InvalidDataset
from app.core.formats import (
    Example,
    Message,
    Render,
    Segment,
    example_from_row,
    prompt_and_response,
    render_segments,
    required_columns,
)
from app.core.spec import CausalLMSettings
from worker.tiny_lm import CHAT_TEMPLATE as TINY_TEMPLATE


def renderer(template: str, eos: str = "</s>", bos: str = "<s>") -> Render:
    """A chat-template renderer as transformers sets up Jinja (trim_blocks, lstrip_blocks)."""
    compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)

    def render(messages: list[Message], add_generation_prompt: bool) -> str:
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos, bos_token=bos
        )

    return render


def settings(**fields: Any) -> CausalLMSettings:
    return CausalLMSettings.model_validate(fields)


PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


# ---- rows to examples --------------------------------------------------------------------------


def test_alpaca_row_becomes_user_and_assistant_turns() -> None:
    row = {"instruction": "Summarise this.", "input": "A long text.", "output": "Short."}

    example = example_from_row(row, settings(format="alpaca"), "text", 1)

    assert example == Example(
        messages=[
            {"role": "user", "content": "Summarise this.\n\nA long text."},
            {"role": "assistant", "content": "Short."},
        ]
    )


def test_alpaca_without_input_column_or_with_an_empty_input() -> None:
    empty = example_from_row({"instruction": "Hi", "input": "", "output": "Hello"}, settings(), "text", 1)
    no_column = example_from_row(
        {"instruction": "Hi", "output": "Hello"}, settings(input_column=None), "text", 1
    )

    assert (
        empty.messages
        == no_column.messages
        == [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    )


def test_column_mapping_is_followed() -> None:
    row = {"question": "2+2?", "answer": "4"}
    mapped = settings(format="prompt-completion", prompt_column="question", completion_column="answer")

    example = example_from_row(row, mapped, "text", 1)

    assert example.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert required_columns(mapped, "text") == {
        "causal_lm.prompt_column": "question",
        "causal_lm.completion_column": "answer",
    }


def test_chat_rows_keep_their_system_message_and_read_sharegpt_keys() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }

    example = example_from_row(
        row, settings(format="chat", system_prompt="Ignored: the row has one."), "x", 1
    )

    assert example.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_a_system_prompt_goes_before_examples_without_one() -> None:
    example = example_from_row(
        {"prompt": "Hi", "completion": "Hello"},
        settings(format="prompt-completion", system_prompt="You are terse."),
        "text",
        1,
    )

    assert example.messages is not None and example.messages[0] == {
        "role": "system",
        "content": "You are terse.",
    }


def test_plain_text_rows_are_texts() -> None:
    example = example_from_row({"body": "Once upon a time."}, settings(format="text"), "body", 1)

    assert example == Example(text="Once upon a time.")


@pytest.mark.parametrize(
    ("fmt", "row", "message"),
    [
        ("alpaca", {"instruction": "Hi", "output": ""}, "Row 7: column 'output' is empty."),
        (
            "alpaca",
            {"instruction": ["a"], "output": "x"},
            "Row 7: column 'instruction' holds a list, not text.",
        ),
        ("chat", {"messages": "hello"}, "Row 7: column 'messages' must be a non-empty list"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "Hi"}]},
            "Row 7: the conversation has no assistant",
        ),
        (
            "chat",
            {"messages": [{"role": "robot", "content": "Hi"}]},
            "Row 7, message 1: role 'robot' is not one",
        ),
        ("text", {"text": None}, "Row 7: column 'text' is empty."),
    ],
)
def test_bad_rows_name_the_row_and_the_problem(fmt: str, row: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidDataset) as caught:
        example_from_row(row, settings(format=fmt), "text", 7)

    assert caught.value.message.startswith(message)
    assert caught.value.row == 7


# ---- conversations to prompt and response ------------------------------------------------------


def test_alpaca_template_splits_prompt_and_response() -> None:
    messages = [{"role": "user", "content": "Give a tip."}, {"role": "assistant", "content": "Sleep well."}]

    prompt, response = prompt_and_response(messages, renderer(ALPACA), "</s>")

    assert prompt == f"{PREAMBLE}\n\n### Instruction:\nGive a tip.\n\n### Response:\n"
    assert response == "Sleep well.</s>"


def test_alpaca_template_puts_a_system_message_in_place_of_the_preamble() -> None:
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
    ]

    prompt, response = prompt_and_response(messages, renderer(ALPACA), "</s>")

    assert prompt == "You answer in French.\n\n### Instruction:\nHello\n\n### Response:\n"
    assert response == "Bonjour</s>"


def test_chatml_response_gets_eos_after_the_turn_end_when_eos_is_another_token() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    segments = render_segments(messages, renderer(CHATML), "</s>")

    assert segments == [
        Segment("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        Segment("Hello<|im_end|></s>", True),
        Segment("\n", False),
    ]


def test_a_template_whose_turns_end_with_eos_ends_the_response_there() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    segments = render_segments(messages, renderer(TINY_TEMPLATE, eos="<|im_end|>"), "<|im_end|>")

    assert segments == [
        Segment("<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        Segment("Hello<|im_end|>", True),
        Segment("\n", False),
    ]


def test_every_assistant_turn_of_a_chat_is_trained() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]

    segments = render_segments(messages, renderer(CHATML, eos="<|im_end|>"), "<|im_end|>")

    assert [segment.text for segment in segments if segment.trained] == [
        "Hello<|im_end|>",
        "Goodbye<|im_end|>",
    ]
    assert "".join(segment.text for segment in segments) == renderer(CHATML)(messages, False)


def test_train_on_prompt_trains_every_segment() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    segments = render_segments(messages, renderer(ALPACA), "</s>", train_on_prompt=True)

    assert all(segment.trained for segment in segments)


def test_plain_template_concatenates_prompt_and_completion() -> None:
    messages = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]

    assert prompt_and_response(messages, renderer(NAMED_TEMPLATES["plain"]), "</s>") == ("2+2=", "4</s>")


def test_a_template_that_rewrites_earlier_turns_is_refused() -> None:
    # The generation prompt differs from the start of the rendered answer: responses cannot be located.
    odd = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    with pytest.raises(InvalidDataset, match="choose a named template"):
        render_segments(messages, renderer(odd), "</s>")


# ---- which template ----------------------------------------------------------------------------


def test_auto_uses_the_tokenizers_own_template_and_falls_back_to_alpaca() -> None:
    assert resolve_template("auto", "{{ x }}") == ("tokenizer", "{{ x }}")
    assert resolve_template("auto", None) == ("alpaca", ALPACA)
    assert resolve_template("chatml", "{{ x }}") == ("chatml", CHATML)


def test_a_model_folders_template_is_read_without_loading_the_tokenizer(tmp_path: Path) -> None:
    assert tokenizer_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": "T"}]}'
    )
    assert tokenizer_chat_template(tmp_path) == "T"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert tokenizer_chat_template(tmp_path) == "J"
