"""Editing steps on a real-sized model shape: seconds per step (keys / values / solve / apply), peak
accelerator memory, and one layer's solve on the accelerator vs the CPU.

The model is built from a config with random weights (nothing is downloaded; the values' quality is
irrelevant to the timings), with the tiny test tokenizer, and edits CounterFact facts.

    python benchmarks/gpu_step.py --shape llama3-8b --dtype bfloat16 --n 200 --step 100   # on a GPU
    python benchmarks/gpu_step.py --shape tiny --n 4 --step 2 --stats-tokens 2000          # CPU check

Anchor: AlphaEdit's paper reports ≈223 s per 100 edits for MEMIT on an A40 (Table 7). On a GPU the
per-phase split of a step is approximate (kernels are asynchronous; a phase ends at its next host
synchronisation); the solve comparison synchronises explicitly. Writes JSON to stdout and, when
``$OUT`` is set, to ``$OUT/gpu_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import seqedit
from seqedit.models.load import wrap_model
from seqedit.shared_data import counterfact_path
from seqedit.testing import tiny_tokenizer

SHAPES = {  # Llama-3-8B's shape; "tiny" checks the script on a CPU in seconds
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, layers=(4, 5, 6, 7, 8)),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, rope_theta=10000.0, layers=(2, 3, 4)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(shape: str, dtype: torch.dtype, device: torch.device):
    spec = dict(SHAPES[shape])
    layers = spec.pop("layers")
    tok = tiny_tokenizer()
    special = tok.eos_token_id
    config = LlamaConfig(**spec, max_position_embeddings=8192, bos_token_id=special, eos_token_id=special,
                         pad_token_id=special)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return wrap_model(model, tok, f"random-{shape}"), layers


def solve_time(editor: seqedit.Editor, layer: int, device: torch.device, n: int) -> dict[str, float]:
    """Seconds to build one layer's state (factorise A) and to solve one step of ``n`` random constraints
    with the state on ``device``."""
    bank = editor.bank
    sigma = bank.sigma0.get(layer)
    if sigma is None:
        raise RuntimeError("the editor dropped Σ₀; build it with keep_sigma0")
    W0 = bank.w0[layer].to(device)
    d_out, d_in = W0.shape
    g = torch.Generator().manual_seed(0)
    K = (1e-2 * torch.randn(d_in, n, generator=g, dtype=torch.float64)).to(device)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64).to(device)
    _sync(device)
    t = time.perf_counter()
    state = bank.spec.init_layer(sigma.to(device), bank.lam, W0)
    _sync(device)
    factor = time.perf_counter() - t
    t = time.perf_counter()
    state.step(K, R, W0)
    _sync(device)
    return {"factorise_s": factor, "solve_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=200, help="facts")
    ap.add_argument("--step", type=int, default=100, help="facts per step")
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--v-steps", type=int, default=25)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--cpu-solve", action="store_true", help="also time the solve with the state on the CPU")
    args = ap.parse_args()

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device(type="cpu")
    t = time.perf_counter()
    lm, layers = build(args.shape, seqedit.models.load.resolve_dtype(args.dtype), device)
    build_s = time.perf_counter() - t
    facts = seqedit.load_facts(counterfact_path(), split="train", limit=args.n)
    editor = seqedit.Editor(lm, method=args.method, layers=layers, stats_tokens=args.stats_tokens,
                            v_steps=args.v_steps)
    editor.bank.keep_sigma0 = True  # the solve comparison below rebuilds a layer's state from Σ₀
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    editor.prepare()
    setup = {"seconds": time.perf_counter() - t, **editor.setup_seconds}
    steps = []
    for report in editor.run(facts, batch_size=args.step):
        steps.append({k: round(v, 3) for k, v in report.seconds.items()} | {"facts": len(report.facts)})
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape, "dtype": args.dtype, "method": args.method, "layers": list(layers),
        "d_in": lm.adapter.dims(layers[0])[1], "build_s": build_s, "setup": setup, "steps": steps,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "solve": {str(device): solve_time(editor, layers[0], device, args.step)},
    }
    if args.cpu_solve and device.type != "cpu":
        result["solve"]["cpu"] = solve_time(editor, layers[0], torch.device(type="cpu"), args.step)
    text = json.dumps(result, indent=2)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_step.json"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
