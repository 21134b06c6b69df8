"""gemma3-run and gemma3-eval on tiny model folders: output formats, the chat loop, and one-line errors."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest

from gemma3.runtime import cli, evaluate
from gemma3.runtime.api import load
from gemma3.runtime.chat import next_user_turn_ids, render_chat
from gemma3.runtime.tokenizer import Tokenizer
from tests.test_runtime_tinymodel import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_cli")
    write_tiny_model(folder, vocab=262144, max_context=128, seed=6, with_tokenizer=True)
    return folder


def run(capsys, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output(capsys, model_dir):
    code, out, err = run(capsys, "--model", model_dir, "-p", "Hello", "--temperature", "0", "--max-new-tokens", "7",
                         "--json", "--threads", "1")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert result["generated_tokens"] == len(result["token_ids"]) == 7 and result["prompt_tokens"] > 5
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb", "kv_cache_bytes"):
        assert result[key] > 0
    expected = load(model_dir).generate("Hello", max_new_tokens=7, temperature=0)
    assert result["text"] == expected.text and result["token_ids"] == expected.token_ids


def test_streamed_text_and_sampling_flags(capsys, model_dir):
    args = ["--model", model_dir, "-p", "Hi", "--max-new-tokens", "9", "--seed", "4", "--temperature", "0.7",
            "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    expected = load(model_dir).generate("Hi", max_new_tokens=9, seed=4, temperature=0.7, top_k=20, top_p=0.9,
                                        min_p=0.01, repetition_penalty=1.1)
    assert out == expected.text + "\n"


def test_raw_and_stdin_prompts(capsys, monkeypatch, model_dir):
    code, out, _ = run(capsys, "--model", model_dir, "--raw", "--json", "--max-new-tokens", "2", stdin="Once upon",
                       monkeypatch=monkeypatch)
    assert code == 0 and json.loads(out)["prompt_tokens"] == 3  # <bos> Once upon


def test_chat_loop_keeps_context(capsys, monkeypatch, model_dir):
    stdin = "Hello\n\nHow are you?\n/reset\nHi again\n/exit\nnever read\n"
    code, out, err = run(capsys, "--model", model_dir, "--chat", "--json", "--temperature", "0",
                         "--max-new-tokens", "3", stdin=stdin, monkeypatch=monkeypatch)
    assert code == 0 and err == ""
    turns = [json.loads(line) for line in out.splitlines()]
    assert len(turns) == 3
    tok = Tokenizer.from_file(model_dir / "tokenizer.model")
    assert turns[0]["prompt_tokens"] == len(render_chat(tok, [{"role": "user", "content": "Hello"}]))
    # Only the new turn (and the previous reply's pending token) is prefilled; the blank line was skipped.
    assert turns[1]["prompt_tokens"] == 1 + len(next_user_turn_ids(tok, "How are you?"))
    # After /reset: a full template again.
    assert turns[2]["prompt_tokens"] == len(render_chat(tok, [{"role": "user", "content": "Hi again"}]))
    # Streaming chat with a first message from -p, ended by EOF.
    code, out, _ = run(capsys, "--model", model_dir, "--chat", "-p", "Hello", "--max-new-tokens", "2",
                       stdin="Next\n", monkeypatch=monkeypatch)
    assert code == 0 and out.count("\n") == 2


def test_chat_context_overflow_is_reported_and_the_loop_goes_on(capsys, monkeypatch, model_dir):
    stdin = "word " * 200 + "\nHi\n"
    code, out, err = run(capsys, "--model", model_dir, "--chat", "--json", "--max-new-tokens", "2", stdin=stdin,
                         monkeypatch=monkeypatch)
    assert code == 0 and "prompt too long" in err and len(out.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{missing}", "-p", "x"], "does not exist"),
        (["--model", "{dir}", "-p", "word " * 200], "prompt too long"),
        (["--model", "{dir}", "-p", "x", "--top-p", "0"], "top_p must be in"),
        (["--model", "{empty}", "-p", "x"], "no manifest.json"),
        (["--model", "{dir}", "--image", "{missing}", "-p", "x"], "text-only"),
    ],
)
def test_errors_are_one_line_with_status_2(capsys, tmp_path, model_dir, args, message):
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "nope", "dir": model_dir, "empty": tmp_path / "empty"}
    code, out, err = run(capsys, *[a.format(**names) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("gemma3-run: error: ") and message in err and err.count("\n") == 1


def test_usage_errors(capsys, model_dir):
    for args in (["--model", model_dir, "--raw", "--chat"], ["--model", model_dir, "--max-new-tokens", "-1"]):
        with pytest.raises(SystemExit) as info:
            cli.main([str(a) for a in args])
        assert info.value.code == 2
    capsys.readouterr()


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--system", "--chat", "--raw", "--max-new-tokens", "--temperature", "--top-k",
                 "--top-p", "--min-p", "--repetition-penalty", "--seed", "--threads", "--json", "--speculative",
                 "--draft-tokens"):
        assert flag in out


def test_console_process_without_torch(model_dir, tmp_path):
    """As a process: streams to stdout, exits 2 with one line and no traceback on errors, never needs torch."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; sys.modules['onnx'] = None\n"
        "from gemma3.runtime.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    ok = subprocess.run([sys.executable, "-c", code, "--model", str(model_dir), "-p", "Hi", "--max-new-tokens", "4"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith("\n") and ok.stderr == ""
    bad = subprocess.run([sys.executable, "-c", code, "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("gemma3-run: error:") and "Traceback" not in bad.stderr


# --- gemma3-eval -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_eval")
    write_tiny_model(folder, vocab=262144, max_context=80, seed=7, with_tokenizer=True)
    return folder


def test_eval_all_logits_and_stepwise_fallback_agree(eval_dir):
    full = evaluate.evaluate(eval_dir, threads=1, targets=128, window=64, chunk=24)
    assert full.tokens == 128 and full.decoder == "decoder_all_logits.onnx" and math.isfinite(full.perplexity)
    assert full.perplexity == pytest.approx(math.exp(full.nll / 128))
    chunked = evaluate.evaluate(eval_dir, threads=1, targets=128, window=64, chunk=64)
    assert chunked.nll == pytest.approx(full.nll, rel=1e-5)
    data = json.loads((eval_dir / "manifest.json").read_text())
    del data["eval_decoder"]
    stepwise_dir = eval_dir.parent / "tiny_eval_stepwise"
    stepwise_dir.mkdir(exist_ok=True)
    for name in ("decoder.onnx", "tokenizer.model"):
        (stepwise_dir / name).write_bytes((eval_dir / name).read_bytes())
    (stepwise_dir / "manifest.json").write_text(json.dumps(data))
    stepwise = evaluate.evaluate(stepwise_dir, threads=1, targets=128, window=64)
    assert stepwise.decoder == "decoder.onnx" and stepwise.nll == pytest.approx(full.nll, rel=1e-5)


def test_eval_cli(capsys, eval_dir, tmp_path):
    assert evaluate.main([str(eval_dir), "--targets", "64", "--window", "32", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 64 and result["perplexity"] > 1
    assert evaluate.main([str(eval_dir), "--targets", "64", "--window", "32"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    assert evaluate.main([str(eval_dir)]) == 2  # the protocol's 1024-token windows do not fit a context of 80
    assert "does not fit" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("gemma3-eval: error: no manifest.json")
