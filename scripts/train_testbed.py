"""Train the testbed OLMoE on the task suite and save a ``from_pretrained`` checkpoint.

The shipped checkpoint (measured on one H100: 28 s of data generation, 200 s of training steps):

    python scripts/train_testbed.py --out reroute/testbed/checkpoint

A CPU smoke run of the whole pipeline on a tiny model (seconds):

    python scripts/train_testbed.py --smoke --out /tmp/testbed-smoke

Next-token loss on every token of every sequence (cue, numbers, demonstrations, answer, EOS) plus OLMoE's
load-balancing loss. Half the training sequences are few-shot (1-4 cued demonstrations before the query), so the
model learns to model its context, which context-only adaptation (continuous rerouting) trains on. Seeded: the
data and the initial weights follow ``--seed``; GPU kernels are not bitwise deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, OlmoeForCausalLM, PreTrainedTokenizerFast
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from reroute.testbed.model import testbed_config
from reroute.testbed.scoring import score_choices
from reroute.testbed.suite import make_split, training_texts
from reroute.testbed.tokenizer import build_tokenizer, encode_training

EVAL_SPLITS = ("test", "test_shift", "test_fewshot")


def dense_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Every expert on every token, each output scaled by its routing weight (zero outside the token's top-k).

    The same function, and the same gradients, as top-k dispatch: an unselected expert contributes ``0 * out``.
    For 64 experts of width 16 it is two plain matmuls instead of 64 tiny grouped GEMMs, which leave a GPU idle
    (one training step of the full model on an H100: grouped_mm 153 ms, this 61 ms).

    hidden_states: ``[N, H]``; top_k_index, top_k_weights: ``[N, k]``. Returns ``[N, H]``.
    """
    weights = torch.zeros(
        hidden_states.shape[0], self.num_experts, dtype=top_k_weights.dtype, device=hidden_states.device
    ).scatter(1, top_k_index, top_k_weights)  # [N, E]
    gate, up = torch.einsum("nh,eih->nei", hidden_states, self.gate_up_proj).chunk(2, dim=-1)  # [N, E, I] each
    return torch.einsum("nei,ehi->nh", self.act_fn(gate) * up * weights[..., None], self.down_proj)


ALL_EXPERTS_FUNCTIONS.register("dense", dense_experts_forward)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` overrides the sizes with a seconds-long CPU run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU: checks the pipeline only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--train-items", type=int, default=300_000, help="distinct training sequences generated")
    parser.add_argument("--eval-items", type=int, default=2000, help="items per split in the final evaluation")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between quick evaluations")
    parser.add_argument("--quick-eval-items", type=int, default=256, help="items per split in quick evaluations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--experts-implementation",
        default="dense",
        help="experts implementation used for training: dense (this script's) or one of transformers' own",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.train_items = 60, 32, 2000
        args.eval_items, args.quick_eval_items, args.eval_every = 32, 16, 30
        args.warmup_steps, args.device = 10, "cpu"
    return args


def pad_sequences(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, T]`` right-padded token ids and ``[N]`` lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_token_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
    return ids, lengths


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def evaluate(
    model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, n: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Multiple-choice accuracy on each evaluation split, overall and per domain."""
    model.eval()
    report = {}
    for split in EVAL_SPLITS:
        items = make_split(split, n, seed)
        correct = score_choices(model, tokenizer, items, batch_size=256).correct
        per_domain: dict[str, list[bool]] = {}
        for item, ok in zip(items, correct.tolist()):
            per_domain.setdefault(item["domain"], []).append(ok)
        report[split] = {"all": float(correct.float().mean())}
        report[split].update({d: sum(v) / len(v) for d, v in sorted(per_domain.items())})
    model.train()
    return report


def train(args: argparse.Namespace) -> dict[str, object]:
    """Train, evaluate and save to ``args.out``; returns the summary also written to ``training_log.json``."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tokenizer = build_tokenizer()
    config = testbed_config(tokenizer, "smoke" if args.smoke else "full")
    config._experts_implementation = args.experts_implementation
    model = OlmoeForCausalLM(config).to(device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)

    start = time.perf_counter()
    ids, lengths = pad_sequences(
        encode_training(tokenizer, training_texts(args.train_items, args.seed)), tokenizer.pad_token_id
    )
    ids, lengths = ids.to(device), lengths.to(device)
    print(f"{len(ids):,} training sequences in {time.perf_counter() - start:.1f} s", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = []
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        rows = torch.randint(0, len(ids), (args.batch_size,), device=device, generator=sampler)
        batch = ids[rows, : int(lengths[rows].max())]
        attention_mask = (batch != tokenizer.pad_token_id).long()
        labels = batch.masked_fill(attention_mask == 0, -100)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        with autocast:
            out = model(input_ids=batch, attention_mask=attention_mask, labels=labels, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record = {
                "step": step + 1,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": round(out.loss.item(), 4),
                "aux_loss": round(out.aux_loss.item(), 4),
                "mc_accuracy": {s: r["all"] for s, r in evaluate(model, tokenizer, args.quick_eval_items).items()},
            }
            history.append(record)
            print(json.dumps(record), flush=True)
    train_seconds = time.perf_counter() - start

    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "history": history,
        "final_mc_accuracy": evaluate(model, tokenizer, args.eval_items),
    }
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=4,
        do_sample=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float32).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "training_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["final_mc_accuracy"], indent=2), flush=True)
    return summary


if __name__ == "__main__":
    train(parse_args())
