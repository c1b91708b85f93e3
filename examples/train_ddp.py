"""Data-parallel training of the character LM (examples/train_lm.py) with torch_mha and DDP.

CPU, two processes (gloo backend):

    torchrun --nproc_per_node 2 examples/train_ddp.py
    torchrun --nproc_per_node 2 examples/train_ddp.py --steps 5 --d-model 32 --layers 1

GPUs, one process per GPU (nccl backend, each rank on cuda:LOCAL_RANK; needs a torch_mha built
with its CUDA kernels):

    torchrun --nproc_per_node 8 examples/train_ddp.py --backend nccl
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
        --nproc_per_node 8 examples/train_ddp.py --backend nccl          # and node_rank 1

Every rank builds the same model (same seed), swaps its attention for torch_mha, then wraps it
in DistributedDataParallel: swap before wrapping, as DDP registers hooks on the parameters it
finds. Each rank samples its own batches (seed + rank); DDP averages the gradients, so the ranks
stay identical, which the script checks at the end.
"""

import argparse
import datetime
import gc
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from train_lm import CORPUS, Batches, CharLM, loss_of

import torch_mha


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="auto: nccl when CUDA is available, else gloo",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("start me with torchrun, e.g. torchrun --nproc_per_node 2 " + __file__)
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    identical = train(args, backend, device, local_rank)
    # The DDP model held the process group; with train()'s locals gone the group's worker threads
    # finish and join here, not during interpreter shutdown, where gloo's last decref of a tensor
    # can abort the process ("terminate called without an active exception").
    gc.collect()
    dist.destroy_process_group()
    if not identical:
        raise SystemExit(f"rank {int(os.environ['RANK'])}: parameters differ between ranks")


def train(args: argparse.Namespace, backend: str, device: torch.device, local_rank: int) -> bool:
    """Trains args.steps steps; returns whether every rank ends with the same parameters."""
    rank, world = dist.get_rank(), dist.get_world_size()

    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()
    symbols = sorted(set(text))
    index = {symbol: i for i, symbol in enumerate(symbols)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = CharLM(len(symbols), args.d_model, args.heads, args.layers, args.length, 0.0)
    torch_mha.swap_attention(model)
    model = DistributedDataParallel(
        model.to(device), device_ids=[local_rank] if device.type == "cuda" else None
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = Batches(data, args.batch, args.length, seed=1 + rank)
    if rank == 0:
        print(
            f"{world} ranks, backend {backend}, device {device.type}; "
            f"global batch {world * args.batch} x {args.length} chars",
            flush=True,
        )

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in batches.next())
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, x, y)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step == 1 or step % max(1, args.steps // 10) == 0):
            print(f"step {step:4d}  loss {mean_loss.item() / world:.4f}", flush=True)
    elapsed = time.perf_counter() - start

    # DDP's invariant: every rank holds the same parameters.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        tokens = args.steps * world * args.batch * args.length
        print(
            f"{args.steps} steps in {elapsed:.1f} s ({tokens / elapsed:,.0f} tokens/s); "
            f"parameters identical on all ranks: {identical}",
            flush=True,
        )
    dist.barrier()
    return identical


if __name__ == "__main__":
    main()
