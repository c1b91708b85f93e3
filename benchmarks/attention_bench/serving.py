"""The serving groups (issue 15): one decode step against a KV cache, generate() and a padded
prefill through a transformers model, each torch_mha against what PyTorch / transformers run.

* "decode": torch_mha.attention_with_kvcache (the new token written into a preallocated cache
  at cache_seqlens, then one query over the cache) vs the same append followed by
  F.scaled_dot_product_attention on K/V repeat_interleave'd to the query heads (the anchor of
  the target), and vs F.sdpa(enable_gqa=True) on the cache as is (a reference: what
  transformers 5.x calls on CPU for a decode step without a padding mask);
* "generate": greedy model.generate() tokens/s of the demo Llama model (examples/llama_demo.py,
  shared with examples/generate_hf.py), attn_implementation "torch_mha" vs "sdpa";
* "prefill": the forward (no grad) of a left-padded batch of different lengths, with its
  attention_mask, through the same model, "torch_mha" vs "sdpa".

All three are inference ("infer" mode: eval + no_grad), fixed shapes, targets at 2 threads at
their default shapes. Registered when workloads.py is imported (at its end).
"""

import argparse
import importlib.util
import os
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import torch_mha

from . import REPO_ROOT
from .targets import RatioTarget
from .timing import Fn, Setup
from .workloads import DTYPES, GroupSpec, Workload, mode_callables, register

DECODE = dict(heads=32, kv_heads=8, head_dim=128, lengths=(1024, 4096, 16384), batches=(1, 4))
HF = dict(model="demo", prompt=512, new_tokens=128, batch=1, seqlens=(1024, 768, 512, 256))
DEMO_MODULE = os.path.join(REPO_ROOT, "examples", "llama_demo.py")

_demo: Optional[ModuleType] = None


def demo() -> ModuleType:
    """examples/llama_demo.py, the model of examples/generate_hf.py (examples/ is not a
    package; loaded by path once)."""
    global _demo
    if _demo is None:
        spec = importlib.util.spec_from_file_location("llama_demo", DEMO_MODULE)
        assert spec is not None and spec.loader is not None
        _demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_demo)
    return _demo


# --------------------------------------------------------------------------------------------
# decode


class DecodeBench:
    """One decode step: q (B, H, 1, D), a preallocated cache (B, Hkv, S, D) holding S - 1
    tokens per sequence (cache_seqlens), and the new token's k/v (B, Hkv, 1, D). Every
    contender writes the new token at position S - 1 and attends over the S keys; the write is
    the same each call, so repeated calls time the same step."""

    def __init__(self, w: Workload) -> None:
        torch.manual_seed(0)
        dtype = DTYPES[w.dtype]
        kv_heads = int(w.option("kv_heads", DECODE["kv_heads"]))
        cache = (w.batch, kv_heads, w.length, w.head_dim)
        self.k_cache, self.v_cache = (
            torch.randn(cache, dtype=dtype),
            torch.randn(cache, dtype=dtype),
        )
        self.seqlens = torch.full((w.batch,), w.length - 1, dtype=torch.int32)
        self.q = torch.randn(w.batch, w.heads, 1, w.head_dim, dtype=dtype)
        self.k_new, self.v_new = (
            torch.randn(w.batch, kv_heads, 1, w.head_dim, dtype=dtype) for _ in range(2)
        )
        self.repeat = w.heads // kv_heads

    def append(self) -> Tuple[Tensor, Tensor]:
        """The anchors' cache update: the new token into the preallocated cache, in place."""
        end = self.k_cache.shape[2]
        self.k_cache[:, :, end - 1 : end] = self.k_new
        self.v_cache[:, :, end - 1 : end] = self.v_new
        return self.k_cache, self.v_cache

    def forward(self, contender: str) -> Callable[[], Tuple[Tensor, Optional[Tensor]]]:
        q, rep = self.q, self.repeat
        if contender == "dec_ours":
            kc, vc, lens, k, v = self.k_cache, self.v_cache, self.seqlens, self.k_new, self.v_new

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return torch_mha.attention_with_kvcache(q, kc, vc, lens, k, v), None

        elif contender == "dec_sdpa_rep":

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                kc, vc = self.append()
                kr, vr = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
                return F.scaled_dot_product_attention(q, kr, vr), None

        else:  # dec_sdpa_gqa

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                kc, vc = self.append()
                return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True), None

        return forward

    def callables(self, contender: str, mode: str) -> Tuple[Setup, Fn]:
        return mode_callables(None, [], self.forward(contender), self.q, mode)


def plan_decode(args: argparse.Namespace, threads: int, dtype: str) -> List[Workload]:
    """--decode-lengths (1024, 4096, 16384 keys after the append) x --decode-batches (1, 4),
    32 query heads on --decode-kv-heads (8) key/value heads of 128."""
    h, d = DECODE["heads"], DECODE["head_dim"]
    kv_heads = int(getattr(args, "decode_kv_heads", None) or DECODE["kv_heads"])
    return [
        Workload(
            "decode", dtype, h * d, h, length, batch, False, threads, (("kv_heads", kv_heads),),
        )
        for batch in getattr(args, "decode_batches", None) or DECODE["batches"]
        for length in getattr(args, "decode_lengths", None) or DECODE["lengths"]
    ]  # fmt: skip


def decode_flops(w: Workload) -> float:
    """4*B*H*S*D: one query against S keys per head."""
    return 4.0 * w.batch * w.heads * w.length * w.head_dim


def decode_estimate_bytes(w: Workload, contender: str, mode: str) -> float:
    """The cache (K and V), plus the repeated copies of the repeat_interleave anchor."""
    item = DTYPES[w.dtype].itemsize
    kv_heads = int(w.option("kv_heads", DECODE["kv_heads"]))
    cache = 2.0 * w.batch * kv_heads * w.length * w.head_dim * item
    if contender == "dec_sdpa_rep":
        return cache + 2.0 * w.batch * w.heads * w.length * w.head_dim * item
    return cache


# --------------------------------------------------------------------------------------------
# generate and prefill: the demo model with either backend


def vocab_size() -> int:
    return len(demo().load_corpus()[1])


def model_parameters(size: str) -> int:
    """Parameters of the demo model (embeddings and output layer included)."""
    s = demo().SIZES[size]
    head_dim = s.hidden // s.heads
    attention = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * head_dim
    layer = attention + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.layers * layer + 2 * vocab_size() * s.hidden + s.hidden


class ModelPairBench:
    """The demo model built twice from the same seed (same weights): attn_implementation
    "torch_mha" for the `*_ours` contender, "sdpa" for the other."""

    def __init__(self, w: Workload) -> None:
        dtype, size = DTYPES[w.dtype], str(w.option("model", HF["model"]))
        self.vocab = vocab_size()
        self.models = {
            backend: demo().build_model(size, self.vocab, backend, 0, dtype).eval()
            for backend in ("torch_mha", "sdpa")
        }

    def model(self, contender: str) -> torch.nn.Module:
        return self.models["torch_mha" if contender.endswith("_ours") else "sdpa"]

    def forward(self, contender: str) -> Callable[[], Tuple[Tensor, Optional[Tensor]]]:
        raise NotImplementedError

    def callables(self, contender: str, mode: str) -> Tuple[Setup, Fn]:
        model = self.model(contender)
        return mode_callables(model, [], self.forward(contender), torch.empty(0), mode)


class GenerateBench(ModelPairBench):
    """Greedy generate() of `new_tokens` tokens after a prompt of w.length random tokens, batch
    w.batch (no padding), the default dynamic cache."""

    def __init__(self, w: Workload) -> None:
        super().__init__(w)
        self.ids, self.mask = demo().padded_batch([w.length] * w.batch, self.vocab, 1)
        self.new_tokens = int(w.option("new_tokens", HF["new_tokens"]))

    def forward(self, contender: str) -> Callable[[], Tuple[Tensor, Optional[Tensor]]]:
        model, ids, mask = self.model(contender), self.ids, self.mask
        # The demo model has no EOS token: every call generates exactly new_tokens tokens.
        kwargs: Dict[str, Any] = dict(max_new_tokens=self.new_tokens, do_sample=False)

        def forward() -> Tuple[Tensor, Optional[Tensor]]:
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs), None

        return forward


def prefill_seqlens(w: Workload) -> List[int]:
    """The prompt lengths of a prefill workload, cut to w.length and w.batch (the memory
    worker's tiny warm-up call shrinks those two)."""
    return [min(int(n), w.length) for n in w.option("seqlens", HF["seqlens"])][: w.batch]


class PrefillBench(ModelPairBench):
    """One forward of a left-padded batch (prompts of different lengths, padding id 0) with its
    attention_mask, logits of the last position only (logits_to_keep=1, as generate() asks)."""

    def __init__(self, w: Workload) -> None:
        super().__init__(w)
        self.ids, self.mask = demo().padded_batch(prefill_seqlens(w), self.vocab, 1)

    def forward(self, contender: str) -> Callable[[], Tuple[Tensor, Optional[Tensor]]]:
        model, ids, mask = self.model(contender), self.ids, self.mask

        def forward() -> Tuple[Tensor, Optional[Tensor]]:
            return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits, None

        return forward


def _model_workload(
    group: str, args: argparse.Namespace, dtype: str, threads: int, length: int, batch: int,
    options: Tuple[Tuple[str, Any], ...],
) -> Workload:  # fmt: skip
    size = str(getattr(args, "hf_model", None) or HF["model"])
    s = demo().SIZES[size]
    return Workload(
        group, dtype, s.hidden, s.heads, length, batch, True, threads,
        (("model", size),) + options,
    )  # fmt: skip


def plan_generate(args: argparse.Namespace, threads: int, dtype: str) -> List[Workload]:
    """--generate-prompt (512) random tokens, --generate-batch (1) sequences, --generate-tokens
    (128) new tokens, the --hf-model (demo) model."""
    new_tokens = int(getattr(args, "generate_tokens", None) or HF["new_tokens"])
    prompt = int(getattr(args, "generate_prompt", None) or HF["prompt"])
    batch = int(getattr(args, "generate_batch", None) or HF["batch"])
    options = (("new_tokens", new_tokens),)
    return [_model_workload("generate", args, dtype, threads, prompt, batch, options)]


def plan_prefill(args: argparse.Namespace, threads: int, dtype: str) -> List[Workload]:
    """One left-padded batch of the --prefill-lengths prompts (1024, 768, 512, 256); the
    workload's length is the longest, its batch the number of prompts."""
    lengths = tuple(int(n) for n in getattr(args, "prefill_lengths", None) or HF["seqlens"])
    options = (("seqlens", lengths),)
    return [_model_workload("prefill", args, dtype, threads, max(lengths), len(lengths), options)]


def generate_flops(w: Workload) -> float:
    """2 x parameters per token processed (prompt and generated); attention not counted."""
    tokens = w.batch * (w.length + int(w.option("new_tokens", HF["new_tokens"])))
    return 2.0 * model_parameters(str(w.option("model", HF["model"]))) * tokens


def prefill_flops(w: Workload) -> float:
    """2 x parameters per real (not padding) token; attention not counted."""
    return 2.0 * model_parameters(str(w.option("model", HF["model"]))) * sum(prefill_seqlens(w))


def model_estimate_bytes(w: Workload, contender: str, mode: str) -> float:
    """Activations of the widest layer (the MLP) plus the cache, float32: far below any budget
    at the demo's sizes; the skip rule never triggers on them."""
    s = demo().SIZES[str(w.option("model", HF["model"]))]
    tokens = w.batch * (w.length + int(w.option("new_tokens", 0)))
    return 4.0 * tokens * (3 * s.intermediate + 2 * s.layers * s.hidden)


# --------------------------------------------------------------------------------------------
# The groups. `python benchmarks/bench_attention.py --serving` runs the three of them.

DECODE_SHAPE = (("heads", 32), ("kv_heads", 8), ("head_dim", 128))
DEMO_MODEL = (
    "the --hf-model Llama model of examples/llama_demo.py (demo: 4 layers, hidden 256, 8 heads "
    "on 2 key/value heads)"
)

register(
    GroupSpec(
        name="decode",
        title="Decode step",
        contenders=("dec_ours", "dec_sdpa_rep", "dec_sdpa_gqa"),
        labels={
            "dec_ours": "torch_mha.attention_with_kvcache (appends the new token)",
            "dec_sdpa_rep": "append + F.scaled_dot_product_attention, K/V repeat_interleave'd",
            "dec_sdpa_gqa": "append + F.scaled_dot_product_attention, enable_gqa=True",
        },
        short={"dec_ours": "ours", "dec_sdpa_rep": "SDPA rep", "dec_sdpa_gqa": "SDPA gqa"},
        pairs=(
            ("dec_sdpa_rep", "dec_ours", "F.sdpa K/V repeated"),
            ("dec_sdpa_gqa", "dec_ours", "F.sdpa enable_gqa"),
        ),
        bench=DecodeBench,
        plan=plan_decode,
        modes=("infer",),
        cli_modes=False,
        cli_help="decode (one decode step, H=32, Hkv=8, D=128, cache 1024-16384, batch 1 and "
        "4 vs F.sdpa on repeated K/V; --decode-lengths, --decode-batches)",
        presets=("serving",),
        flops=decode_flops,
        estimate_bytes=decode_estimate_bytes,
        memory_table=True,
        warm_modes=("infer",),
        note=(
            "q (B, 32, 1, 128); a preallocated cache (B, 8, S, 128) holding S-1 tokens per "
            "sequence (L below = S, the keys after the append). ours = torch_mha."
            "attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new): writes "
            "the new token at cache_seqlens and attends over the S keys, the 8 K/V heads read "
            "in place. SDPA rep = the same in-place append, then F.sdpa on K/V "
            "repeat_interleave'd to 32 heads in the timed call (the target's anchor). SDPA gqa "
            "= the append, then F.sdpa(enable_gqa=True) on the cache as is (a reference, no "
            "target; transformers 5.23 calls this for a decode step without a padding mask). "
            "Inference, no grad. GFLOP/s: 4*B*H*S*D."
        ),
        targets=(
            RatioTarget(
                "decode step H=32, Hkv=8, D=128, cache 1024-16384, batch 1 and 4, 2 threads, "
                "vs F.sdpa with K/V repeated (issue 15)",
                "infer",
                "F.sdpa K/V repeated",
                2.0,
                lengths=(1024, 16384),
                where=DECODE_SHAPE,
            ),
        ),
    )
)

register(
    GroupSpec(
        name="generate",
        title="generate()",
        contenders=("gen_ours", "gen_sdpa"),
        labels={
            "gen_ours": 'transformers generate(), attn_implementation="torch_mha"',
            "gen_sdpa": 'transformers generate(), attn_implementation="sdpa"',
        },
        short={"gen_ours": "torch_mha", "gen_sdpa": "sdpa"},
        pairs=(("gen_sdpa", "gen_ours", "sdpa backend"),),
        bench=GenerateBench,
        plan=plan_generate,
        modes=("infer",),
        cli_modes=False,
        cli_help="generate (greedy generate() tokens/s of the demo Llama model, torch_mha vs "
        "sdpa backend; --hf-model, --generate-prompt, --generate-tokens, --generate-batch)",
        presets=("serving",),
        flops=generate_flops,
        estimate_bytes=model_estimate_bytes,
        warm_modes=("infer",),
        memory=False,
        max_repeats=5,
        note=(
            f"Greedy model.generate() of new_tokens tokens after a prompt of L random tokens, "
            f"batch B, default (dynamic) cache, {DEMO_MODEL}, same weights for both backends. "
            "tokens/s = B * new_tokens / median; the speed-up is the tokens/s ratio. GFLOP/s: 2 "
            "x parameters per token processed, attention not counted."
        ),
        targets=(
            RatioTarget(
                "generate() tokens/s of the demo model, torch_mha vs sdpa backend, 2 threads "
                "(issue 15)",
                "infer",
                "sdpa backend",
                1.3,
                lengths=(1, 1 << 30),
                where=(("model", "demo"),),
            ),
        ),
    )
)

register(
    GroupSpec(
        name="prefill",
        title="Padded prefill",
        contenders=("pre_ours", "pre_sdpa"),
        labels={
            "pre_ours": 'transformers forward, attn_implementation="torch_mha"',
            "pre_sdpa": 'transformers forward, attn_implementation="sdpa"',
        },
        short={"pre_ours": "torch_mha", "pre_sdpa": "sdpa"},
        pairs=(("pre_sdpa", "pre_ours", "sdpa backend"),),
        bench=PrefillBench,
        plan=plan_prefill,
        modes=("infer",),
        cli_modes=False,
        cli_help="prefill (a left-padded batch of prompts of 1024, 768, 512, 256 tokens through "
        "the demo Llama model, torch_mha vs sdpa backend; --prefill-lengths)",
        presets=("serving",),
        flops=prefill_flops,
        estimate_bytes=model_estimate_bytes,
        warm_modes=("infer",),
        memory=False,
        note=(
            f"One forward (no grad) of B left-padded prompts (lengths in `seqlens`, L = the "
            f"longest) with their attention_mask through {DEMO_MODEL}, logits of the last "
            "position only (logits_to_keep=1, as generate() asks). torch_mha gets the padding "
            "as a key padding mask with is_causal (torch_mha.hf), sdpa the 4-D bool mask "
            "transformers builds. GFLOP/s: 2 x parameters per real token, attention not counted."
        ),
        targets=(
            RatioTarget(
                "padded prefill (1024, 768, 512, 256) through the demo model, torch_mha vs sdpa "
                "backend, 2 threads (issue 15)",
                "infer",
                "sdpa backend",
                1.2,
                lengths=(1, 1 << 30),
                where=(("model", "demo"), ("seqlens", HF["seqlens"])),
            ),
        ),
    )
)
