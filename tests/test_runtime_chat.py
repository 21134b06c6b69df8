"""The chat template as ids, against Gemma 3's own Jinja template (rendered by jinja2 and by transformers)."""

from __future__ import annotations

import pytest

from gemma3.runtime.chat import next_user_turn_ids, raw_prompt_ids, render_chat
from gemma3.runtime.tokenizer import Tokenizer
from tests.test_runtime_tinymodel import tokenizer_bytes

# chat_template of google/gemma-3-*-it's tokenizer_config.json, verbatim.
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Why?\n"}],
    "multi_turn": [
        {"role": "system", "content": "Be brief.\n"},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": " 7 \n\n"},
        {"role": "user", "content": "Another,\n\n one?"},
        {"role": "model", "content": "11"},
        {"role": "user", "content": "def f(x):\n    return x  # code\n\n"},
    ],
    "parts": [
        {"role": "system", "content": [{"type": "text", "text": " sys part "}]},
        {"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "text", "text": "b\n"}]},
    ],
    "unicode": [{"role": "user", "content": "Привет 👋🏽, 你好\t!"}],
}


def jinja_render(messages, add_generation_prompt=True) -> str:
    import jinja2

    def raise_exception(message):
        raise ValueError(message)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    # transformers renders with the template's roles as given ("model" is not rewritten): so do we here.
    return env.from_string(GEMMA3_TEMPLATE).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt
    )


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_bytes(tokenizer_bytes())


def test_single_turn_layout(tok):
    ids = render_chat(tok, CONVERSATIONS["single"])
    assert ids == [2, 105, *tok.encode("user\nHello!"), 106, 107, 105, *tok.encode("model\n")]
    assert ids[:2] == [2, 105] and tok.encode("\n") == [107]
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<bos><start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n")


def test_system_is_folded_into_the_first_turn(tok):
    ids = render_chat(tok, CONVERSATIONS["system"])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == "<bos><start_of_turn>user\nYou are terse.\n\nWhy?<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_the_jinja_template(tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = jinja_render(messages, add_generation_prompt)
    ids = render_chat(tok, messages, add_generation_prompt)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids == tok.encode(text)  # the rendered string tokenized as a whole gives the same ids


def test_next_turn_continues_the_rendered_conversation(tok):
    """First turn + the model's reply + next_user_turn_ids == the template over the whole conversation."""
    first = next_user_turn_ids(tok, "Name a prime.", system="Be brief.", first=True)
    reply = tok.encode("7")  # what the model generated, <end_of_turn> sampled but not fed
    follow = next_user_turn_ids(tok, " Another one? ")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another one?"}]
    assert first + reply + follow == render_chat(tok, messages)
    assert follow[:3] == [106, 107, 105]


def test_raw_prompt(tok):
    assert raw_prompt_ids(tok, "Once upon") == [2, *tok.encode("Once upon")]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "at least one message"),
        ([{"role": "system", "content": "x"}], "user message after the system"),
        ([{"role": "assistant", "content": "x"}], "message 0 has role 'assistant' where 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
         "message 2 has role 'system'"),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "role 'bot'"),
        ([{"role": "user"}], "mapping with 'role' and 'content'"),
        ([{"role": "user", "content": 3}], "string or a list of parts"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported message content part"),
    ],
)
def test_invalid_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(tok, messages)


@pytest.mark.real270m
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_transformers_apply_chat_template(tok, hf_270m_tokenizer, name):
    messages = CONVERSATIONS[name]
    expected = hf_270m_tokenizer.apply_chat_template(
        messages, chat_template=GEMMA3_TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert render_chat(tok, messages) == list(expected)


def test_image_parts_become_start_of_image_markers():
    """The template writes `<start_of_image>` for an image part, in place, next to the trimmed text parts."""
    from gemma3.runtime.chat import message_text

    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe it. "},
                                            {"type": "image"}]}
    assert message_text(message) == "<start_of_image>Describe it.<start_of_image>"
