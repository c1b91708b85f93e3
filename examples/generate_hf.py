"""Train and run a small Llama model in Hugging Face transformers with "sdpa" and "torch_mha".

A LlamaForCausalLM with grouped-query heads (8 query heads on 2 key/value heads; the shared
construction is examples/llama_demo.py) is built from a LlamaConfig with random weights, once
with attn_implementation="sdpa" and once with "torch_mha" (registered by `import torch_mha.hf`),
the second loading the first's state_dict. Both train in the same process, one step each in
turn, on the same batches of the bundled corpus (CPython standard-library source, a character
vocabulary, as examples/train_lm.py uses), then both generate greedily (model.generate with
its KV cache) from the same validation-text prompt.

Printed at the end: both runs' training losses and their largest difference (the backends
compute the same function, so the losses start equal to float32 rounding; rounding then makes
the two trajectories drift slowly: they "agree" when within 1% at every step), training and
generation tokens/s (medians, the two backends alternating so that machine noise hits both
alike), the speed-ups (torch_mha / sdpa), whether the greedy tokens agree, and the text the
torch_mha model generated. --json writes the figures to a file.

    python examples/generate_hf.py                  # about 5 minutes on 2 busy cores
    python examples/generate_hf.py --short          # tiny model, a few steps: seconds
    python examples/generate_hf.py --steps 100 --threads 2 --json out/generate_hf.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import torch_mha

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_demo import SIZES, build_model, decode, encode, load_corpus  # noqa: E402
from train_lm import Batches, ProgressBar  # noqa: E402

NAMES = ("sdpa", "torch_mha")
# Both backends compute the same function in float32; their sums run in different orders, so
# the losses start equal to rounding and the two trajectories drift apart slowly, as any two
# float32 runs of a chaotic optimisation do. "Agree" = within 1% of the loss at every step.
LOSS_RTOL = 0.01
SAME_TO = 1e-5


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: Tensor) -> float:
    # transformers shifts the labels itself: position i predicts token i + 1.
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.item())


def train(
    models: Dict[str, torch.nn.Module], data: Tensor, args: argparse.Namespace
) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Alternating steps on the same batches; returns the losses and the step times (the
    first step, a warm-up, is not timed)."""
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=args.lr) for name, model in models.items()
    }
    # Batches yields (input, next chars); the model shifts its labels, so the input is enough.
    sampler = Batches(data, args.batch, args.length, args.seed)
    losses: Dict[str, List[float]] = {name: [] for name in NAMES}
    times: Dict[str, List[float]] = {name: [] for name in NAMES}
    bar = ProgressBar()
    for step in range(1, args.steps + 1):
        x, _ = sampler.next()
        for name in NAMES if step % 2 else NAMES[::-1]:  # alternate who goes first
            model, optimizer = models[name], optimizers[name]
            model.train()
            optimizer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = train_step(model, optimizer, x)
            if step > 1:
                times[name].append(time.perf_counter() - start)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{name}: loss became {loss} at step {step}")
            losses[name].append(loss)
        text = f"step {step}/{args.steps}  loss sdpa {losses['sdpa'][-1]:.3f}  "
        bar.update(step / args.steps, text + f"torch_mha {losses['torch_mha'][-1]:.3f}")
    bar.close()
    return losses, times


@torch.no_grad()
def generate(
    models: Dict[str, torch.nn.Module], prompt: Tensor, new_tokens: int, rounds: int
) -> Tuple[Dict[str, Tensor], Dict[str, List[float]]]:
    """Greedy generate() with the default (dynamic) cache, `rounds` times per backend in
    alternating order after one warm-up call each; returns the tokens and the times."""
    kwargs: Dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    attention_mask = torch.ones_like(prompt)
    tokens: Dict[str, Tensor] = {}
    times: Dict[str, List[float]] = {name: [] for name in NAMES}
    for model in models.values():
        model.eval()
    for name in NAMES:  # warm-up: first-call set-up is not timed
        warm = prompt[:, :8]
        models[name].generate(input_ids=warm, attention_mask=torch.ones_like(warm), **kwargs)
    for r in range(rounds):
        for name in NAMES if r % 2 == 0 else NAMES[::-1]:
            start = time.perf_counter()
            out = models[name].generate(input_ids=prompt, attention_mask=attention_mask, **kwargs)
            times[name].append(time.perf_counter() - start)
            tokens[name] = out[:, prompt.shape[1] :]
    return tokens, times


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="tiny model, few steps (seconds)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: demo")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 40)")
    parser.add_argument("--length", type=int, default=None, help="training context (128)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (8)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--prompt-chars", type=int, default=None, help="prompt length (256)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (128)")
    parser.add_argument("--gen-rounds", type=int, default=None, help="timed generate() calls (3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    # --short fills what is not given with tiny values; the defaults are the demo's.
    defaults = dict(
        size="tiny" if args.short else "demo",
        steps=6 if args.short else 40,
        length=64 if args.short else 128,
        batch=4 if args.short else 8,
        prompt_chars=48 if args.short else 256,
        new_tokens=24 if args.short else 128,
        gen_rounds=2 if args.short else 3,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "length", "batch", "prompt_chars", "new_tokens", "gen_rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is a warm-up)")
    limit = SIZES[args.size].max_positions
    if args.prompt_chars + args.new_tokens > limit or args.length > limit:
        parser.error(f"the {args.size} model has {limit} positions")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    text, symbols = load_corpus()
    data = encode(text, symbols)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    models = {name: build_model(args.size, len(symbols), name, args.seed) for name in NAMES}
    # Same seed, same weights already; copying makes "same weights" not depend on it.
    models["torch_mha"].load_state_dict(models["sdpa"].state_dict())
    size = SIZES[args.size]
    parameters = sum(p.numel() for p in models["sdpa"].parameters())
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, torch_mha "
        f"{torch_mha.__version__} ({torch.ops.torch_mha._cpu_capability()} kernels), "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"model: LlamaForCausalLM ({args.size}), {size.layers} layers, hidden {size.hidden}, "
        f"{size.heads} heads on {size.kv_heads} key/value heads (head dim "
        f"{size.hidden // size.heads}), {len(symbols)} symbols, {parameters / 1e6:.2f} M "
        f"parameters; attn_implementation sdpa and torch_mha, same initial weights"
    )
    tokens_per_step = args.batch * args.length
    print(
        f"training {args.steps} steps each, batch {args.batch} x {args.length} chars "
        f"({tokens_per_step} tokens/step), AdamW lr {args.lr:g}, float32 "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
        flush=True,
    )
    losses, step_times = train(models, train_data, args)

    prompt = val_data[: args.prompt_chars].unsqueeze(0)
    print(
        f"generating {args.new_tokens} tokens greedily after a {args.prompt_chars}-char prompt, "
        f"{args.gen_rounds} timed generate() calls per backend",
        flush=True,
    )
    generated, gen_times = generate(models, prompt, args.new_tokens, args.gen_rounds)

    train_tps = {n: tokens_per_step / statistics.median(step_times[n]) for n in NAMES}
    gen_tps = {n: args.new_tokens / statistics.median(gen_times[n]) for n in NAMES}
    pairs = list(zip(losses["sdpa"], losses["torch_mha"]))
    loss_diff = max(abs(a - b) for a, b in pairs)
    relative = max(abs(a - b) / abs(a) for a, b in pairs)
    close = relative < LOSS_RTOL
    same_steps = next((i for i, (a, b) in enumerate(pairs) if abs(a - b) > SAME_TO), len(pairs))
    same_tokens = bool(torch.equal(generated["sdpa"], generated["torch_mha"]))
    agree = int((generated["sdpa"] == generated["torch_mha"]).sum())

    print(f"\nafter {args.steps} steps each (same initial weights, same batches):")
    print(f"{'':36}{'sdpa':>14}{'torch_mha':>14}")
    rows = [
        ("first training loss", [losses[n][0] for n in NAMES], "{:.4f}"),
        ("final training loss", [losses[n][-1] for n in NAMES], "{:.4f}"),
        ("training tokens/s (median step)", [train_tps[n] for n in NAMES], "{:,.0f}"),
        ("generation tokens/s (median call)", [gen_tps[n] for n in NAMES], "{:,.1f}"),
    ]
    for label, values, fmt in rows:
        print(f"{label:36}" + "".join(f"{fmt.format(v):>14}" for v in values))
    print(
        f"loss difference: max |sdpa - torch_mha| over {args.steps} steps {loss_diff:.2e} "
        f"({relative * 100:.2f}% of the loss; within {SAME_TO:g} for the first {same_steps} "
        f"steps): {'agree' if close else 'DISAGREE'} (tolerance {LOSS_RTOL * 100:g}%)"
    )
    speedup_train = train_tps["torch_mha"] / train_tps["sdpa"]
    speedup_gen = gen_tps["torch_mha"] / gen_tps["sdpa"]
    print(f"training speed-up (tokens/s, torch_mha / sdpa): {speedup_train:.2f}x")
    print(f"generation speed-up (tokens/s, torch_mha / sdpa): {speedup_gen:.2f}x")
    print(
        f"greedy tokens identical: {same_tokens} ({agree}/{generated['sdpa'].numel()} "
        f"positions agree; load average {os.getloadavg()[0]:.1f} at the end)"
    )
    sample = decode(generated["torch_mha"][0].tolist(), symbols)
    # repr: after a short training run greedy text is often runs of spaces and newlines.
    print(f"generated by the torch_mha model (after the prompt): {sample!r}")

    summary: Dict[str, Any] = {
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "parameters": parameters,
        "losses": losses,
        "max_loss_difference": loss_diff,
        "max_relative_loss_difference": relative,
        "steps_within_1e-5": same_steps,
        "losses_agree": close,
        "train_tokens_per_s": train_tps,
        "generate_tokens_per_s": gen_tps,
        "train_speedup": speedup_train,
        "generate_speedup": speedup_gen,
        "generated_tokens": {n: generated[n].tolist() for n in NAMES},
        "greedy_tokens_identical": same_tokens,
        "sample": sample,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"figures: {args.json}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return summary


if __name__ == "__main__":
    main()
