"""gemma3-run: generate with an exported Gemma 3 folder on ONNX Runtime (no torch needed).

    gemma3-run --model out/gemma-3-270m-it -p "Why is the sky blue?"
    echo "Write a haiku." | gemma3-run --model out/gemma-3-270m-it --temperature 0 --json
    gemma3-run --model out/gemma-3-270m-it --chat --system "Answer briefly."
    gemma3-run --model out/gemma-3-4b-it --image cat.jpg -p "What is in this image?"
    gemma3-run --model out/gemma-3-4b-it --image a.png --image b.png -p "Is <start_of_image> like <start_of_image>?"
    gemma3-run --model out/gemma-3-1b-it --temperature 0 --speculative draft:out/gemma-3-270m-it -p "..."
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TextIO

from gemma3.runtime.api import DEFAULT_MAX_NEW_TOKENS, ChatSession, Model, Result, Stream, load, sampling_overrides
from gemma3.runtime.kv_cache import ContextLengthError
from gemma3.runtime.manifest import ManifestError
from gemma3.runtime.sampling import SamplingParams
from gemma3.runtime.speculative import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, Speculative

log = logging.getLogger("gemma3.runtime.cli")
PROG = "gemma3-run"
EXIT_USAGE = 2  # bad arguments, unusable model folder, prompt too long
CHAT_HELP = ("chat: type a message and press Enter; /image PATH attaches an image to your next message, "
             "/reset starts over, /exit (or Ctrl-D) quits")


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default only when it has a meaningful one (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with a Gemma 3 model exported by gemma3-export, on ONNX Runtime (CPU).",
        epilog="The prompt goes through Gemma's chat template unless --raw is given. Without -p and --chat the "
        "prompt is read from stdin. Sampling defaults come from the model's manifest (Gemma: top-k 64, top-p "
        "0.95, temperature 1.0); --temperature 0 is greedy decoding. Exit status 2 on unusable arguments, a "
        "missing or broken model folder, or a prompt longer than the model's context.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", "-m", required=True, metavar="DIR", help="exported model folder (with manifest.json)")
    p.add_argument("-p", "--prompt", metavar="TEXT", help="the prompt (with --chat: the first message)")
    p.add_argument("--system", metavar="TEXT", help="system instructions, folded into the first user turn")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin, keeping the KV cache")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text after <bos>")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help="stop after N generated tokens")
    i = p.add_argument_group("images (4b, 12b, 27b)")
    i.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable); placed at each <start_of_image> in the prompt, in "
                   "order, or before the text when the prompt has none. In --chat, attach one with /image PATH")
    i.add_argument("--pan-and-scan", action="store_true",
                   help="also show the model crops of long images (Pan & Scan: aspect ratio over 1.2)")
    i.add_argument("--max-crops", type=int, default=4, metavar="N", help="Pan & Scan crops per image at most")
    s = p.add_argument_group("sampling (default: the manifest's generation_defaults)")
    s.add_argument("--temperature", type=float, metavar="T", help="softmax temperature; 0 = greedy")
    s.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens; 0 = off")
    s.add_argument("--top-p", type=float, metavar="P", help="nucleus: keep the top tokens holding P; 1 = off")
    s.add_argument("--min-p", type=float, metavar="P", help="drop tokens below P x the top probability; 0 = off")
    s.add_argument("--repetition-penalty", type=float, metavar="R", help="> 1 discourages tokens already in context")
    s.add_argument("--seed", type=int, metavar="S", help="random seed, for reproducible sampling")
    d = p.add_argument_group("speculative decoding (greedy: same tokens as without it, fewer decoder steps)")
    d.add_argument("--speculative", default="off", metavar="{off,lookup,draft:DIR}",
                   help="draft tokens and verify them in one step: 'lookup' copies what followed the context's last "
                   "words earlier in the context (quoting, summarising, editing), 'draft:DIR' asks a smaller export "
                   "with the same tokenizer (the 270M for 1b..27b). Greedy only (--temperature 0): with sampling it "
                   "is skipped with a warning")
    d.add_argument("--draft-tokens", type=int, metavar="K",
                   help=f"tokens drafted per verify step, 1..{MAX_DRAFT_TOKENS} (default: {DEFAULT_DRAFT_TOKENS})")
    p.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per reply (text, token_ids, token counts, speeds, memory)")
    p.add_argument("-v", "--verbose", action="store_true", help="log loading details and speed to stderr")
    return p


def _emit(stream: Stream, out: TextIO, as_json: bool) -> Result:
    if as_json:
        result = stream.consume()
        out.write(json.dumps(result.as_dict(), ensure_ascii=False) + "\n")
    else:
        for piece in stream:
            out.write(piece)
            out.flush()
        result = stream.result
        out.write("\n")
    out.flush()
    s = result.stats
    log.info(
        "%d prompt tokens at %.1f tok/s, %d generated at %.1f tok/s (%s); KV cache %.1f MiB, peak RSS %.0f MiB",
        s.prompt_tokens, s.prefill_tokens_per_s, s.generated_tokens, s.decode_tokens_per_s, s.finish_reason,
        s.kv_cache_bytes / 2**20, s.peak_rss_mb,
    )
    if s.speculative:
        log.info("speculative (%s): %d of %d drafted tokens accepted (%.0f%%), %.2f tokens per decoder step",
                 s.speculative, s.accepted_tokens, s.drafted_tokens, 100 * s.acceptance_rate, s.tokens_per_step)
    return result


def _chat_loop(session: ChatSession, first: str | None, inp: TextIO, out: TextIO, as_json: bool,
               images: list[str] | None = None, **image_options) -> None:
    interactive = inp.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    pending, attached = first, list(images or [])
    while True:
        if pending is not None:
            text, pending = pending, None
        else:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            text = inp.readline()
            if not text:  # end of input
                return
        command = text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            continue
        if command.startswith("/image"):
            path = command[len("/image"):].strip()
            if path:
                attached.append(path)
            else:
                print(f"{PROG}: usage: /image PATH", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            _emit(session.stream(text, images=attached, **image_options), out, as_json)
        except ContextLengthError as e:
            print(f"{PROG}: error: {e} (/reset starts a new conversation)", file=sys.stderr)
        except ValueError as e:  # a bad image, or images for a text-only model: the chat goes on
            print(f"{PROG}: error: {e}", file=sys.stderr)
        attached = []


def _read_prompt(args: argparse.Namespace) -> str:
    """-p TEXT, or stdin; an empty one (or only whitespace) is refused unless images stand for the prompt."""
    prompt = args.prompt
    source = "-p"
    if prompt is None:
        if sys.stdin.isatty():
            raise ValueError("give a prompt with -p TEXT (or on stdin), or use --chat")
        try:
            prompt, source = sys.stdin.read(), "stdin"
        except UnicodeDecodeError as e:  # binary input: say where it came from
            raise ValueError(f"stdin is not UTF-8 text ({e})") from None
    if not prompt.strip() and not args.image:
        raise ValueError(f"the prompt is empty ({source} gave no text): give some text with -p TEXT or on stdin")
    return prompt


def _run(args: argparse.Namespace) -> int:
    sampling = sampling_overrides({k: getattr(args, k) for k in vars(args)})
    SamplingParams().updated(sampling)  # nan, inf, out-of-range or negative values: one line before the slow load
    speculative = {"speculative": Speculative.parse(args.speculative, args.draft_tokens)}  # likewise
    prompt = None if args.chat else _read_prompt(args)  # also before the load: no model just to say "no prompt"
    model: Model = load(args.model, threads=args.threads)
    if (args.image or args.pan_and_scan) and not model.sees_images:
        raise ValueError(f"the {model.manifest.model.name} model is text-only: it cannot take images "
                         "(images need a 4b, 12b or 27b export)")
    image_options = {"pan_and_scan": args.pan_and_scan, "max_crops": args.max_crops}
    if args.chat:
        session = model.chat(system=args.system, max_new_tokens=args.max_new_tokens, **speculative, **sampling)
        _chat_loop(session, args.prompt, sys.stdin, sys.stdout, args.json, args.image, **image_options)
        return 0
    assert prompt is not None
    stream = model.stream(prompt, system=args.system, raw=args.raw, max_new_tokens=args.max_new_tokens,
                          images=args.image, **image_options, **speculative, **sampling)
    _emit(stream, sys.stdout, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # basicConfig leaves a level set earlier in the process (an embedding program, the exporter's CLI) alone;
    # ours decides -v, which also decides whether ONNX Runtime's own log shows (ort_decoder.session_options).
    logging.getLogger("gemma3").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.raw and (args.chat or args.system is not None):
        parser.error("--raw cannot be combined with --chat or --system (both need the chat template)")
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.max_crops < 1:
        parser.error("--max-crops must be >= 1")
    if args.draft_tokens is not None and args.speculative == "off":
        parser.error("--draft-tokens needs --speculative lookup or draft:DIR")
    try:
        return _run(args)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 0
    except (ManifestError, ContextLengthError, ValueError, OSError) as e:
        log.debug("details", exc_info=True)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
