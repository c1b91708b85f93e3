"""DistributedDataParallel with torch_mha: 2 CPU processes (gloo) against one process.

Each run trains a small Transformer-encoder classifier (PyTorch's nn.TransformerEncoder with its
attention swapped for torch_mha) in float64 for a few Adam steps. The reference is the same model
trained in a single process on the same global batches:

* dropout 0: the single process takes the mean loss over the global batch (DDP averages the two
  ranks' gradients of their half-batch mean losses, which is the same gradient);
* dropout 0.1: torch_mha and nn.Dropout draw from torch's default generator, and torch_mha's mask
  for a sequence depends on its index in the batch, so a global-batch forward draws other masks
  than two half-batch forwards. Each rank seeds its generator with (step, rank) before its forward;
  the single process replays the two half-batches with the same seeds and accumulates half of each
  gradient (what DDP's average computes). The run is then deterministic and must match too.

Both ranks must also end with bitwise identical parameters (DDP's invariant).
"""

import datetime
import gc
import os
import socket
import tempfile
import time
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import torch_mha

WORLD = 2
STEPS = 5
GLOBAL_BATCH = 8
LENGTH = 12
VOCAB = 20
CLASSES = 5
D_MODEL = 32
DROPOUTS = (0.0, 0.1)
# float64; the only differences are summation order (DDP's all-reduce against one batched
# forward), amplified a little by Adam's normalisation.
TOLERANCE = 1e-10
TIMEOUT_S = 180


class Classifier(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(
            D_MODEL, 4, 64, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, CLASSES)

    def forward(self, tokens: Tensor, padding: Tensor) -> Tensor:
        x = self.encoder(self.embed(tokens), src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1))


def build_model(dropout: float) -> nn.Module:
    torch.manual_seed(1234)
    model = Classifier(dropout).double()
    report = torch_mha.swap_attention(model)
    assert len(report) == 2
    return model


def global_batch(step: int) -> Tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (GLOBAL_BATCH,), generator=generator)
    padding = torch.arange(LENGTH).unsqueeze(0) >= lengths.unsqueeze(1)
    labels = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator)
    return tokens, padding, labels


def rank_slice(rank: int) -> slice:
    half = GLOBAL_BATCH // WORLD
    return slice(rank * half, (rank + 1) * half)


def dropout_seed(step: int, rank: int) -> int:
    return 1000 * step + rank


def loss_of(model: nn.Module, batch: Tuple[Tensor, Tensor, Tensor], part: slice) -> Tensor:
    tokens, padding, labels = batch
    logits = model(tokens[part], padding[part])
    return nn.functional.cross_entropy(logits, labels[part])


def train_single_process(dropout: float) -> Dict[str, Tensor]:
    model = build_model(dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        batch = global_batch(step)
        optimizer.zero_grad()
        if dropout == 0.0:
            loss_of(model, batch, slice(None)).backward()
        else:
            for rank in range(WORLD):
                torch.manual_seed(dropout_seed(step, rank))
                (loss_of(model, batch, rank_slice(rank)) / WORLD).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        for dropout in DROPOUTS:
            train_ddp_rank(rank, dropout, out_dir)
    finally:
        # The DDP models (which hold the process group) are gone once train_ddp_rank returns, so
        # gloo's worker threads join here rather than during interpreter shutdown, where they can
        # abort the process.
        gc.collect()
        dist.destroy_process_group()


def train_ddp_rank(rank: int, dropout: float, out_dir: str) -> None:
    model = DistributedDataParallel(build_model(dropout))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        torch.manual_seed(dropout_seed(step, rank))
        optimizer.zero_grad()
        loss_of(model, global_batch(step), rank_slice(rank)).backward()
        optimizer.step()
    params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
    torch.save(params, os.path.join(out_dir, f"dropout{dropout}-rank{rank}.pt"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results() -> Dict[float, List[Dict[str, Tensor]]]:
    """Runs the 2-process job once (both dropout settings); returns each rank's parameters."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("this torch build has no gloo backend")
    with tempfile.TemporaryDirectory() as out_dir:
        # Gloo picks its network interface from the hostname unless told; loopback always works.
        if os.path.isdir("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        context = mp.start_processes(
            ddp_worker,
            args=(free_port(), out_dir),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the DDP job did not finish within {TIMEOUT_S} s")
        return {
            dropout: [
                torch.load(os.path.join(out_dir, f"dropout{dropout}-rank{rank}.pt"))
                for rank in range(WORLD)
            ]
            for dropout in DROPOUTS
        }


@pytest.mark.parametrize("dropout", DROPOUTS)
def test_ddp_matches_single_process(
    ddp_results: Dict[float, List[Dict[str, Tensor]]], dropout: float
) -> None:
    torch.set_num_threads(1)  # the reference run is tiny (conftest restores the count)
    ranks = ddp_results[dropout]
    for name, value in ranks[0].items():
        assert torch.equal(ranks[1][name], value), f"ranks disagree on {name}"

    expected = train_single_process(dropout)
    initial = {name: p.detach() for name, p in build_model(dropout).named_parameters()}
    assert ranks[0].keys() == expected.keys()
    worst = max((ranks[0][name] - value).abs().max().item() for name, value in expected.items())
    moved = max((value - initial[name]).abs().max().item() for name, value in expected.items())
    print(f"\ndropout {dropout}: max |DDP - single process| = {worst:.3g} (moved {moved:.3g})")
    assert moved > 1e-2  # the steps really trained
    for name, value in expected.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=TOLERANCE, msg=name)
    if dropout > 0.0:  # dropout really acted: the run differs from the dropout-free one
        plain = ddp_results[0.0][0]
        assert max((plain[n] - v).abs().max().item() for n, v in ranks[0].items()) > 1e-4
