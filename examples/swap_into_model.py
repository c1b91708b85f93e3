"""Swap torch_mha into an existing model, check it computes the same thing, and swap back.

    python examples/swap_into_model.py

The model here is PyTorch's nn.Transformer plus a block that holds its own attention module (as
third-party code does); any nn.Module works the same way. Swap before creating the optimizer,
wrapping with DistributedDataParallel, torch.compile or torch.jit.script.
"""

import copy

import torch
from torch import Tensor, nn

import torch_mha


class Captioner(nn.Module):
    """An "existing model": nn.Transformer, then a pooling block with its own attention."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(
            d_model=64,
            nhead=4,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=128,
            dropout=0.0,
            batch_first=True,
        )
        self.pool = nn.MultiheadAttention(64, 4, batch_first=True)
        self.query = nn.Parameter(torch.randn(1, 1, 64))

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=torch.bool)
        x = self.transformer(src, tgt, tgt_mask=mask, tgt_is_causal=True)
        pooled, _ = self.pool(self.query.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return pooled.squeeze(1)


def main() -> None:
    torch.manual_seed(0)
    model = Captioner()
    original = copy.deepcopy(model)  # kept only to compare with

    # 1. Swap in place (swap_attention(model, inplace=False) would return a swapped copy).
    report = torch_mha.swap_attention(model)
    print(report)

    # 2. Same outputs and gradients as before the swap.
    src, tgt = torch.randn(2, 10, 64), torch.randn(2, 7, 64)
    outputs = []
    for m in (original, model):
        out = m(src, tgt)
        out.square().sum().backward()
        outputs.append(out)
    out_diff = (outputs[0] - outputs[1]).abs().max().item()
    grad_diff = max(
        (a.grad - b.grad).abs().max().item()
        for a, b in zip(original.parameters(), model.parameters())
    )
    print(f"max |difference| from the original: output {out_diff:.1e}, gradients {grad_diff:.1e}")

    # 3. Train as usual (the optimizer sees the same Parameter objects as before the swap).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(src, tgt).square().mean().backward()
        optimizer.step()

    # 4. Checkpoints are interchangeable: load the trained weights into the nn model ...
    original.load_state_dict(model.state_dict())
    # ... or turn the model back into plain PyTorch modules.
    restored = torch_mha.restore_attention(model)
    print(f"restore_attention: {len(restored)} module(s) back to {restored.target}")
    with torch.no_grad():
        same = torch.equal(model(src, tgt), original(src, tgt))
    print(f"restored model equals the nn model with the trained weights: {same}")


if __name__ == "__main__":
    main()
