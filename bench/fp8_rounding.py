"""How much E4M3 rounding of each projection's input costs, and whether a better scale could lower it.

    python -m bench.fp8_rounding [--tokens 1024]

Real Gemma 3 270M, our PyTorch model in fp32. The per-tensor scales are the exporter's (absmax of the calibration
text / 448); the inputs are those of the eval text (eval-protocol.md's ids). Per projection input it prints the
relative RMS rounding error with that static scale, with an ideal per-token scale (each token's own absmax), the
fraction of elements that clip and the fraction below E4M3's normal range (2^-6 after scaling). An error near
E4M3's floor for every scale means no calibration trick can buy fp8 activations back (README, fp8 bullet).
"""

from __future__ import annotations

import argparse

import sentencepiece
import torch
from torch import nn

from bench.peers import load_inputs
from gemma3.exporter.calibrate import calibration_ids, input_statistics
from gemma3.graphs import load_checkpoint, open_checkpoint
from gemma3.graphs.loaders.embedded import embedded_270m_gguf
from gemma3.graphs.loaders.gguf_tokenizer import sentencepiece_model_from_gguf

E4M3_MAX = 448.0


def fake_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def projection_inputs(model: nn.Module, ids: list[int]) -> dict[str, torch.Tensor]:
    """Every nn.Linear's input (tokens x channels) of the text decoder for one sequence."""
    seen: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_pre_hook(
        lambda _m, inputs, name=name: seen.__setitem__(name, inputs[0].detach().reshape(-1, inputs[0].shape[-1])))
        for name, module in model.text.named_modules() if isinstance(module, nn.Linear)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="eval tokens (default 1024)")
    args = parser.parse_args()
    gguf = embedded_270m_gguf()
    model = load_checkpoint(gguf).eval()
    tokenizer = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model_from_gguf(gguf))
    # the exporter's own calibration statistics (what its fp8 activation scales are made of), keyed by weight name
    ids = calibration_ids(tokenizer.encode, model.config.bos_token_id)
    absmax = input_statistics(open_checkpoint(gguf, size="270m"), ids).absmax
    evaluation = projection_inputs(model, load_inputs(gguf).eval_ids[: args.tokens])
    print(f"{'projection input':28s} {'static':>7s} {'token':>7s} {'clip':>9s} {'subnormal':>9s}")
    for name, x in evaluation.items():
        if name.endswith((".k_proj", ".v_proj", ".up_proj")):
            continue  # the same input as q_proj / gate_proj
        bound = absmax[f"text.{name}.weight"]
        scale = bound / E4M3_MAX
        per_token = x.abs().amax(1, keepdim=True).clamp(min=1e-30) / E4M3_MAX
        static = ((fake_fp8(x, scale) - x).norm() / x.norm()).item()
        token = ((fake_fp8(x, per_token) - x).norm() / x.norm()).item()
        clip = (x.abs() > bound).float().mean().item()
        subnormal = (x.abs() / scale < 2**-6).float().mean().item()
        print(f"{name:28s} {static:7.2%} {token:7.2%} {clip:9.2e} {subnormal:9.2%}")


if __name__ == "__main__":
    main()
