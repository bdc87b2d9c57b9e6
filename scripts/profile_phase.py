"""Where one rerouting phase spends its time on a GPU (OLMoE-1B-7B shape, random bf16 weights).

Times, per setting (Triton kernels on/off): one no-grad forward of the context, one forward+backward to the
offsets, one whole adaptation phase (5 steps), and the decode time per token. Prints a table.

    python scripts/profile_phase.py --shape olmoe-1b-7b --tokens 128 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_common import build  # noqa: E402

import reroute  # noqa: E402
from reroute.frozen import frozen_weights  # noqa: E402
from reroute.rerouting import RerouterConfig, adapt_phase, context_loss, routing_confidence, select_layers  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return sorted(out)[len(out) // 2]


def measure(rm: reroute.RoutedModel, n: int) -> tuple[list[int], float, float, float, float]:
    """Seconds for: a no-grad forward, a forward+backward to δ, a whole phase, one decode token."""
    ids = torch.randint(3, 500, (1, n), device="cuda")
    mask = torch.ones_like(ids)
    cfg = RerouterConfig()
    layers = select_layers(rm, cfg, routing_confidence(rm, ids, mask))
    delta = torch.zeros(1, len(layers), rm.num_experts, device="cuda")

    def forward():
        with torch.no_grad():
            context_loss(rm, ids, mask)

    def forward_backward():
        param = delta.clone().requires_grad_()
        rm.set_row_offsets({idx: param[:, j] for j, idx in enumerate(layers)})
        with frozen_weights(rm.model):
            context_loss(rm, ids, mask).sum().backward()

    def phase():
        adapt_phase(rm, cfg, layers, delta.clone(), ids, mask)

    def decode():
        rm.model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)

    times = timed(forward), timed(forward_backward), timed(phase), timed(decode) / 16
    rm.reset()
    return sorted(layers), *times


def generation(rm: reroute.RoutedModel, prompt: int, new: int) -> dict[str, float]:
    """Seconds per ``generate()`` of ``new`` tokens: plain, the decoding loop alone (steps=0), one phase at
    prefill only, and the default (phases at prefill and every 128 tokens)."""
    ids = torch.randint(3, 500, (1, prompt), device="cuda")
    kwargs = dict(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    runs = {
        "plain generate()": lambda: rm.model.generate(**kwargs),
        "Rerouter steps=0": lambda: reroute.Rerouter(rm, steps=0).generate(**kwargs),
        "prefill phase only": lambda: reroute.Rerouter(rm, interval=10**6).generate(**kwargs),
        "default (interval 128)": lambda: reroute.Rerouter(rm).generate(**kwargs),
    }
    return {name: timed(fn, repeats=2) for name, fn in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="olmoe-1b-7b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--generate", action="store_true", help="time whole generate() calls (128 + 256 tokens)")
    args = parser.parse_args()
    model = build(args.shape, "cuda", torch.bfloat16)
    print(f"{args.shape}, bf16, on {torch.cuda.get_device_name()}")
    for kernels in (True, False):
        rm = reroute.attach(model, kernels=kernels)
        if args.generate:
            for name, seconds in generation(rm, 128, 256).items():
                print(f"kernels={kernels!s:<5} {name:<24} {seconds:7.3f} s", flush=True)
            rm.detach()
            continue
        for n in args.tokens:
            layers, f, fb, ph, dec = measure(rm, n)
            print(
                f"kernels={kernels!s:<5} tokens={n:<5} layers={layers} forward {1e3 * f:7.1f} ms  "
                f"fwd+bwd {1e3 * fb:7.1f} ms  phase {1e3 * ph:7.1f} ms  decode/token {1e3 * dec:6.1f} ms  "
                f"phase/decode-token {ph / dec:5.1f}",
                flush=True,
            )
        rm.detach()


if __name__ == "__main__":
    main()
