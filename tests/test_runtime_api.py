"""The Python API on a tiny model folder with Gemma's real tokenizer: load, generate, stream, chat sessions."""

from __future__ import annotations

import json

import pytest

from gemma3.runtime.api import Result, load
from gemma3.runtime.chat import next_user_turn_ids, raw_prompt_ids, render_chat
from gemma3.runtime.generate import generate
from gemma3.runtime.kv_cache import ContextLengthError
from gemma3.runtime.manifest import ManifestError
from gemma3.runtime.sampling import SamplingParams
from tests.test_runtime_tinymodel import write_tiny_model

VOCAB = 262144  # the tokenizer's size: the tiny model must have a row for every id


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_api")
    write_tiny_model(folder, vocab=VOCAB, max_context=256, seed=5, with_tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir, threads=1)


def test_generate_a_text_prompt(model):
    result = model.generate("Hello there", system="Be nice.", max_new_tokens=12, temperature=0)
    assert isinstance(result, Result) and len(result.token_ids) == 12 and result.finish_reason == "length"
    assert result.text == model.tokenizer.decode(result.token_ids)
    ids = render_chat(model.tokenizer, [{"role": "system", "content": "Be nice."},
                                        {"role": "user", "content": "Hello there"}])
    s = result.stats
    assert s.prompt_tokens == len(ids) and s.generated_tokens == 12 and s.decode_steps == 11
    assert s.kv_cache_bytes > 0 and s.peak_rss_mb > 0
    d = result.as_dict()
    assert set(d) == {"text", "token_ids", "finish_reason", "prompt_tokens", "generated_tokens",
                      "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb", "kv_cache_bytes"}
    json.dumps(d)
    # Same prompt as explicit messages, and as the decoder sees it: the same greedy tokens.
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello there"}]
    assert model.generate(messages, max_new_tokens=12, temperature=0).token_ids == result.token_ids
    direct = generate(model.decoder, model.decoder.new_cache(), ids, SamplingParams(temperature=0), 12)
    assert [p.token_id for p in direct] == result.token_ids


def test_stream_yields_the_text_as_it_comes(model):
    stream = model.stream("Tell me a story", max_new_tokens=15, temperature=0.8, seed=3)
    pieces = list(stream)
    assert stream.result is not None and "".join(pieces) == stream.result.text
    assert all(pieces) and len(pieces) <= 15
    again = model.generate("Tell me a story", max_new_tokens=15, temperature=0.8, seed=3)
    assert again.token_ids == stream.result.token_ids  # seeded: reproducible


def test_raw_prompts_and_prompt_errors(model):
    assert model.prompt_ids("Once upon", raw=True) == raw_prompt_ids(model.tokenizer, "Once upon")
    assert model.generate("Once upon", raw=True, max_new_tokens=3).stats.prompt_tokens == 3
    with pytest.raises(ValueError, match="system prompt needs the chat template"):
        model.prompt_ids("x", system="s", raw=True)
    with pytest.raises(ValueError, match="alternate"):
        model.generate([{"role": "assistant", "content": "x"}])
    with pytest.raises(ContextLengthError, match="prompt too long: .* context of 256"):
        model.stream("word " * 300)  # raised at the call, before anything runs


def test_sampling_defaults_come_from_the_manifest(model):
    assert model.defaults == SamplingParams(temperature=1.0, top_k=64, top_p=0.95)
    assert model.sampling(top_k=5, seed=None).top_k == 5
    with pytest.raises(TypeError, match="unknown sampling"):
        model.generate("x", temprature=0.5)


def test_chat_keeps_the_cache_and_prefills_only_new_tokens(model):
    tok = model.tokenizer
    chat = model.chat(system="Be brief.", temperature=0, max_new_tokens=6)
    first = chat.send("Name a prime.")
    first_ids = next_user_turn_ids(tok, "Name a prime.", "Be brief.", first=True)
    assert first.stats.prompt_tokens == len(first_ids) and first.finish_reason == "length"
    cache = chat.cache
    assert cache.length == len(first_ids) + 5  # the 6th token is pending: nothing needed its logits yet
    before = list(chat.tokens)
    assert before == first_ids + first.token_ids

    second = chat.send("Another one?")
    follow = next_user_turn_ids(tok, "Another one?")
    assert chat.cache is cache
    assert second.stats.prompt_tokens == 1 + len(follow)  # the pending reply token + the new turn, nothing else
    assert chat.tokens == before + follow + second.token_ids
    assert [m["role"] for m in chat.messages] == ["system", "user", "model", "user", "model"]

    # The reply is what a fresh cache gives on the whole conversation so far.
    fresh = generate(model.decoder, model.decoder.new_cache(), before + follow, SamplingParams(temperature=0), 6)
    assert [p.token_id for p in fresh] == second.token_ids


def test_chat_errors_leave_the_session_usable(model):
    chat = model.chat(temperature=0, max_new_tokens=4)
    chat.send("Hi")
    tokens, length = list(chat.tokens), chat.cache.length
    with pytest.raises(ContextLengthError, match="already in context"):
        chat.send("word " * 250)
    assert chat.tokens == tokens and chat.cache.length == length
    stream = chat.stream("Still there?")
    with pytest.raises(RuntimeError, match="previous reply"):
        chat.stream("Hello?")
    list(stream)
    assert chat.send("Bye").stats.prompt_tokens > 0
    chat.reset()
    assert chat.cache is None and chat.tokens == [] and chat.send("Hi").token_ids == chat.tokens[-4:]


def test_load_errors(tmp_path, model_dir):
    with pytest.raises(ManifestError, match="does not exist"):
        load(tmp_path / "missing")
    folder = tmp_path / "m"
    write_tiny_model(folder, vocab=64, max_context=32)
    with pytest.raises(ManifestError, match="tokenizer model .* is missing"):
        load(folder)
    (folder / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
    with pytest.raises(ManifestError, match="tokenizer has 262144 pieces but the model only 64"):
        load(folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["target"] = "trt"
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="target 'trt'"):
        load(folder)


def test_seeded_chat_is_reproducible(model):
    def conversation(seed):
        chat = model.chat(temperature=1.0, seed=seed, max_new_tokens=5)
        return [chat.send(text).token_ids for text in ("Hi", "Go on", "More")]

    first = conversation(8)
    assert conversation(8) == first and conversation(9) != first
    assert len({tuple(ids) for ids in first}) == 3  # one random stream across turns, not the seed replayed per turn
