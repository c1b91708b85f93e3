"""The small Llama-style model of the transformers demo, shared by examples/generate_hf.py and
the benchmark's "generate" and "prefill" groups (benchmarks/attention_bench).

A character-level vocabulary over the bundled corpus (examples/data, as examples/train_lm.py
uses) and a `LlamaConfig` with grouped-query heads (8 query heads on 2 key/value heads), built
with random weights from a seed, for any attn_implementation ("sdpa", "eager", or "torch_mha"
once `import torch_mha.hf` has registered it). No network: nothing is downloaded.
"""

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "data", "cpython_stdlib.txt")


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int


SIZES: Dict[str, ModelSize] = {
    # The demo and the benchmark: 8 heads of 32 on 2 key/value heads, about 3 M parameters.
    "demo": ModelSize(
        hidden=256, layers=4, heads=8, kv_heads=2, intermediate=688, max_positions=4096
    ),
    # For tests: the same head layout, a fraction of the work.
    "tiny": ModelSize(
        hidden=64, layers=2, heads=8, kv_heads=2, intermediate=128, max_positions=512
    ),
}


def load_corpus() -> Tuple[str, List[str]]:
    """The corpus text and its sorted symbols (the vocabulary; id = position in the list)."""
    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()
    return text, sorted(set(text))


def encode(text: str, symbols: List[str]) -> Tensor:
    index = {symbol: i for i, symbol in enumerate(symbols)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def decode(ids: List[int], symbols: List[str]) -> str:
    return "".join(symbols[i] for i in ids)


def llama_config(size: str, vocab: int) -> Any:
    """No BOS/EOS token: generate() always runs max_new_tokens, so tokens/s count them all."""
    from transformers import LlamaConfig

    s = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_positions,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )


def build_model(
    size: str, vocab: int, attn_implementation: str, seed: int, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A LlamaForCausalLM with random weights drawn from `seed`: the same weights for every
    attn_implementation (the attention backend owns no parameters)."""
    from transformers import LlamaForCausalLM

    if attn_implementation == "torch_mha":
        import torch_mha.hf  # noqa: F401  (registers "torch_mha")
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(
        llama_config(size, vocab), attn_implementation=attn_implementation
    )
    return model.to(dtype)


def padded_batch(lengths: List[int], vocab: int, seed: int) -> Tuple[Tensor, Tensor]:
    """Left-padded random token ids (padding id 0) and their attention mask (1 = token), the
    layout generate() expects from a tokenizer with padding_side="left"."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
        ids[row, : width - length] = 0
    return ids, mask
