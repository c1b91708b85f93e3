"""torch_mha as a Hugging Face transformers attention backend (torch_mha.hf), against
attn_implementation="eager" on tiny models built from configs with random weights (no network):
logits, every parameter gradient, the attention weights, and greedy generate() with dynamic and
static caches. Architectures: Llama with plain multi-head attention and with grouped-query heads,
Mistral (sliding window), Gemma 2 (softcapping and sliding windows), gpt-oss (attention sinks,
sliding windows, grouped-query heads) and BERT (an encoder with padding)."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import torch_mha.hf  # noqa: E402, F401  (registers "torch_mha")
from torch_mha.hf import TorchMhaMask  # noqa: E402

VOCAB = 97


def llama_mha():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip


def llama_gqa():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip


def mistral_window():
    return transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
        max_position_embeddings=128,
    )  # fmt: skip


def gemma2_softcap():
    return transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
        attn_logit_softcapping=3.0, final_logit_softcapping=30.0, max_position_embeddings=128,
    )  # fmt: skip


def gpt_oss_sinks():
    return transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip


DECODERS: Dict[str, Callable] = {
    "llama_mha": llama_mha,
    "llama_gqa": llama_gqa,
    "mistral_window": mistral_window,
    "gemma2_softcap": gemma2_softcap,
    "gpt_oss_sinks": gpt_oss_sinks,
}


def pair(config_fn: Callable, model_class=None) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """The same random model with eager attention and with torch_mha."""
    model_class = model_class or transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    eager = model_class.from_config(config_fn(), attn_implementation="eager")
    ours = model_class.from_config(config_fn(), attn_implementation="torch_mha")
    ours.load_state_dict(eager.state_dict())
    for model in (eager, ours):
        model.float().eval()
    return eager, ours


def batch(lengths=(13, 9)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids and their attention mask (1 = token)."""
    torch.manual_seed(1)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
        ids[row, : width - length] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(DECODERS))
def test_logits_and_gradients_match_eager(name: str) -> None:
    eager, ours = pair(DECODERS[name])
    ids, mask = batch()
    # Only real tokens predicted from real tokens count: the logits at a padding position (which
    # would predict the first real token) differ by design (see below).
    predicted_from_padding = torch.cat([torch.ones_like(mask[:, :1]), 1 - mask[:, :-1]], 1)
    labels = ids.masked_fill((mask == 0) | (predicted_from_padding == 1), -100)
    results = []
    for model in (eager, ours):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager_logits, eager_grads), (our_logits, our_grads) = results
    # Padding positions are not compared: eager spreads a fully masked row uniformly over the
    # masked keys, torch_mha gives it zeros; no real token attends to them.
    real = mask.bool()
    torch.testing.assert_close(our_logits[real], eager_logits[real], atol=2e-5, rtol=2e-5)
    assert eager_grads.keys() == our_grads.keys()
    for param, grad in eager_grads.items():
        if grad is None:
            assert our_grads[param] is None, param
            continue
        torch.testing.assert_close(our_grads[param], grad, atol=5e-5, rtol=5e-4, msg=param)


@pytest.mark.parametrize("name", ["llama_gqa", "gemma2_softcap", "gpt_oss_sinks"])
def test_output_attentions_match_eager(name: str) -> None:
    eager, ours = pair(DECODERS[name])
    ids, _ = batch((11, 11))
    with torch.no_grad():
        theirs = eager(input_ids=ids, output_attentions=True).attentions
        mine = ours(input_ids=ids, output_attentions=True).attentions
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_greedy_generate_matches_eager(name: str, cache: str) -> None:
    eager, ours = pair(DECODERS[name])
    ids, mask = batch((7, 4))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        expected = eager.generate(input_ids=ids, attention_mask=mask, **kwargs)
        got = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, expected)


def test_set_attn_implementation_and_masks_are_described() -> None:
    """set_attn_implementation switches an existing model; its layers receive TorchMhaMask
    descriptions (no dense mask) for causal and sliding-window patterns."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(mistral_window())
    model.set_attn_implementation("torch_mha")
    assert model.config._attn_implementation == "torch_mha"
    seen = []
    original = torch_mha.hf.torch_mha_attention

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("torch_mha", spy)
    try:
        ids, mask = batch()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        transformers.AttentionInterface.register("torch_mha", original)
    assert seen and all(isinstance(m, TorchMhaMask) and m.dense is None for m in seen)
    assert {m.window for m in seen} == {6} and all(m.causal for m in seen)
    assert all(m.padding is not None for m in seen)


def test_dropout_in_training_runs_and_is_seeded() -> None:
    config = llama_gqa()
    config.attention_dropout = 0.3
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="torch_mha")
    model.train()
    ids, mask = batch()
    torch.manual_seed(5)
    a = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(5)
    b = model(input_ids=ids, attention_mask=mask).logits
    c = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    with torch.no_grad():
        d = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(a, d)


def test_bert_encoder_with_padding_matches_eager() -> None:
    def config():
        return transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=64,
        )  # fmt: skip

    eager, ours = pair(config, transformers.AutoModel)
    ids, mask = batch((12, 5))
    mask = mask.flip(1)  # right padding, as BERT tokenizers do
    ids = ids.flip(1)
    outs = []
    for model in (eager, ours):
        model.zero_grad()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden * mask[..., None]).sum().backward()
        outs.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters()}))
    real = mask.bool()
    torch.testing.assert_close(outs[1][0][real], outs[0][0][real], atol=2e-5, rtol=2e-5)
    for param, grad in outs[0][1].items():
        if grad is not None:
            torch.testing.assert_close(outs[1][1][param], grad, atol=5e-5, rtol=5e-4, msg=param)


def test_import_without_transformers_is_clean() -> None:
    """torch_mha itself never imports transformers."""
    import subprocess
    import sys

    code = (
        "import sys; import torch_mha; "
        "assert 'transformers' not in sys.modules, 'torch_mha imported transformers'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
