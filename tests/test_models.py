"""torch_mha inside real models: the swap helper, whole-model parity with torch.nn, training.

The reference is always the untouched torch.nn model (nn.MultiheadAttention inside PyTorch's own
Transformer modules), built from the same weights; nothing here compares torch_mha with itself.
"""

import copy
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import torch_mha

D_MODEL = 32
HEADS = 4
FF = 64
LAYERS = 2
BATCH = 3
SRC_LEN = 7
TGT_LEN = 6
F64 = {"rtol": 1e-10, "atol": 1e-12}
F32 = {"rtol": 1e-5, "atol": 1e-5}


# ---------------------------------------------------------------------------------------------
# Models and inputs


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models: one thread is faster and immune to a busy machine (conftest restores it)."""
    torch.set_num_threads(1)


def make_model(kind: str, batch_first: bool, norm_first: bool, dtype: torch.dtype) -> nn.Module:
    def norm() -> nn.LayerNorm:
        return nn.LayerNorm(D_MODEL, dtype=dtype)

    options = dict(dropout=0.0, batch_first=batch_first, norm_first=norm_first, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor notices
        if kind == "encoder":
            layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, **options)
            return nn.TransformerEncoder(layer, LAYERS, norm=norm(), enable_nested_tensor=False)
        if kind == "decoder":
            layer = nn.TransformerDecoderLayer(D_MODEL, HEADS, FF, **options)
            return nn.TransformerDecoder(layer, LAYERS, norm=norm())
        assert kind == "transformer"
        return nn.Transformer(D_MODEL, HEADS, LAYERS, LAYERS, FF, **options)


def padding_mask(lengths: List[int], total: int) -> Tensor:
    """(N, S) bool, True on the padded (right-hand) positions; position 0 is never padded, so
    no query has all of its keys masked, even with a causal mask."""
    return torch.arange(total).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)


def causal_mask(length: int) -> Tensor:
    """Bool, True above the diagonal (masked), like the padding masks: nn warns on mixed types."""
    return torch.ones(length, length, dtype=torch.bool).triu(1)


def make_inputs(
    kind: str, batch_first: bool, masks: str, dtype: torch.dtype
) -> Tuple[Tensor, Tensor, Dict[str, object]]:
    """Returns (src, tgt, forward kwargs) for `kind`; src feeds the encoder (or the decoder's
    memory), tgt the decoder."""
    src = torch.randn(BATCH, SRC_LEN, D_MODEL, dtype=dtype)
    tgt = torch.randn(BATCH, TGT_LEN, D_MODEL, dtype=dtype)
    if not batch_first:
        src, tgt = src.transpose(0, 1).contiguous(), tgt.transpose(0, 1).contiguous()
    causal = "causal" in masks
    padded = "padding" in masks
    src_pad = padding_mask([SRC_LEN, 5, 3], SRC_LEN) if padded else None
    tgt_pad = padding_mask([TGT_LEN, 4, 2], TGT_LEN) if padded else None
    kwargs: Dict[str, object] = {}
    if kind == "encoder":
        length = SRC_LEN
        if causal:
            kwargs["mask"] = causal_mask(length)
            kwargs["is_causal"] = True
        kwargs["src_key_padding_mask"] = src_pad
    else:
        if causal:
            kwargs["tgt_mask"] = causal_mask(TGT_LEN)
            kwargs["tgt_is_causal"] = True
        kwargs["tgt_key_padding_mask"] = tgt_pad
        kwargs["memory_key_padding_mask"] = src_pad
        if kind == "transformer":
            kwargs["src_key_padding_mask"] = src_pad
    return src, tgt, kwargs


def run(kind: str, model: nn.Module, src: Tensor, tgt: Tensor, kwargs: Dict[str, object]) -> Tensor:
    if kind == "encoder":
        return model(src, **kwargs)
    if kind == "decoder":
        return model(tgt, src, **kwargs)
    return model(src, tgt, **kwargs)


def attention_modules(model: nn.Module, cls: type) -> List[nn.Module]:
    return [m for m in model.modules() if type(m) is cls]


def count_calls(modules: List[nn.Module]) -> Tuple[List[int], Callable[[], None]]:
    """Forward hooks counting calls; returns the counter and a function removing the hooks."""
    calls = [0]

    def hook(module: nn.Module, args: object, output: object) -> None:
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in modules]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return calls, remove


def forward_backward(
    kind: str,
    model: nn.Module,
    src: Tensor,
    tgt: Tensor,
    kwargs: Dict[str, object],
    weight: Tensor,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Output and the gradients of a fixed random projection of it: every parameter and both
    inputs (the decoder alone does not use src through an encoder, but as memory)."""
    model.zero_grad(set_to_none=True)
    src = src.detach().requires_grad_()
    tgt = tgt.detach().requires_grad_()
    out = run(kind, model, src, tgt, kwargs)
    (out * weight).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["<src>"] = src.grad
    grads["<tgt>"] = tgt.grad
    return out.detach(), grads


def assert_same_gradients(
    ours: Dict[str, Optional[Tensor]], reference: Dict[str, Optional[Tensor]], tol: Dict[str, float]
) -> None:
    assert ours.keys() == reference.keys()
    for name, expected in reference.items():
        actual = ours[name]
        if expected is None:
            assert actual is None, name
            continue
        assert actual is not None, name
        torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"grad of {name}: {m}")


# ---------------------------------------------------------------------------------------------
# Whole-model parity


@pytest.mark.parametrize("masks", ["none", "padding", "causal", "causal+padding"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
def test_swapped_model_matches_nn(
    kind: str, batch_first: bool, norm_first: bool, mode: str, masks: str
) -> None:
    reference = make_model(kind, batch_first, norm_first, torch.float64)
    reference.train(mode == "train")
    ours = copy.deepcopy(reference)
    report = torch_mha.swap_attention(ours)
    expected_count = {"encoder": LAYERS, "decoder": 2 * LAYERS, "transformer": 3 * LAYERS}[kind]
    assert len(report) == expected_count
    assert not attention_modules(ours, nn.MultiheadAttention)
    swapped = attention_modules(ours, torch_mha.MultiheadAttention)
    assert len(swapped) == expected_count
    assert all(m.training == (mode == "train") for m in swapped)

    src, tgt, kwargs = make_inputs(kind, batch_first, masks, torch.float64)
    weight = torch.randn(run(kind, reference, src, tgt, kwargs).shape, dtype=torch.float64)
    expected_out, expected_grads = forward_backward(kind, reference, src, tgt, kwargs, weight)
    calls, remove = count_calls(swapped)
    out, grads = forward_backward(kind, ours, src, tgt, kwargs, weight)
    remove()
    assert calls[0] == expected_count  # every attention call went through torch_mha
    torch.testing.assert_close(out, expected_out, **F64)
    assert_same_gradients(grads, expected_grads, F64)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_swapped_transformer_matches_nn_float32(batch_first: bool) -> None:
    reference = make_model("transformer", batch_first, False, torch.float32)
    ours = torch_mha.swap_attention(reference, inplace=False).model
    src, tgt, kwargs = make_inputs("transformer", batch_first, "causal+padding", torch.float32)
    weight = torch.randn(run("transformer", reference, src, tgt, kwargs).shape)
    expected_out, expected_grads = forward_backward(
        "transformer", reference, src, tgt, kwargs, weight
    )
    out, grads = forward_backward("transformer", ours, src, tgt, kwargs, weight)
    torch.testing.assert_close(out, expected_out, **F32)
    assert_same_gradients(grads, expected_grads, F32)


def test_adam_steps_give_the_same_parameters() -> None:
    reference = make_model("transformer", True, True, torch.float64)
    ours = torch_mha.swap_attention(reference, inplace=False).model
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (reference, ours)]
    for step in range(3):
        src, tgt, kwargs = make_inputs("transformer", True, "causal+padding", torch.float64)
        target = torch.randn(BATCH, TGT_LEN, D_MODEL, dtype=torch.float64)
        losses = []
        for model, optimizer in zip((reference, ours), optimizers):
            optimizer.zero_grad()
            loss = (run("transformer", model, src, tgt, kwargs) - target).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], **F64, msg=f"loss at step {step}")
    expected = dict(reference.named_parameters())
    changed = 0
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-9, atol=1e-10, msg=name)
        changed += 1
    assert changed == len(expected)


def test_optimizer_created_before_an_inplace_swap_keeps_working() -> None:
    """Parameters keep their identity through a swap, so optimizer state carries over: one
    Adam step before the swap and two after equal three steps of the unswapped model."""
    reference = make_model("encoder", True, False, torch.float64)
    ours = copy.deepcopy(reference)
    opt_ref = torch.optim.Adam(reference.parameters(), lr=1e-2)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    params_before = [id(p) for p in ours.parameters()]
    for step in range(3):
        if step == 1:
            torch_mha.swap_attention(ours)
            assert [id(p) for p in ours.parameters()] == params_before
        src, _, kwargs = make_inputs("encoder", True, "causal", torch.float64)
        for model, optimizer in ((reference, opt_ref), (ours, opt_ours)):
            optimizer.zero_grad()
            model(src, **kwargs).square().mean().backward()
            optimizer.step()
    assert len(attention_modules(ours, torch_mha.MultiheadAttention)) == LAYERS
    for (name, param), expected in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-9, atol=1e-10, msg=name)
        state, expected_state = opt_ours.state[param], opt_ref.state[expected]
        torch.testing.assert_close(state["exp_avg_sq"], expected_state["exp_avg_sq"], **F64)


def test_restore_round_trip_gives_identical_nn_modules() -> None:
    original = make_model("transformer", True, True, torch.float64)
    expected_state = copy.deepcopy(original.state_dict())
    model = copy.deepcopy(original)
    torch_mha.swap_attention(model)
    report = torch_mha.restore_attention(model)
    assert report.source == "torch_mha.MultiheadAttention"
    assert report.target == "torch.nn.MultiheadAttention"
    assert len(report) == 3 * LAYERS
    assert not attention_modules(model, torch_mha.MultiheadAttention)
    assert len(attention_modules(model, nn.MultiheadAttention)) == 3 * LAYERS
    state = model.state_dict()
    assert list(state.keys()) == list(expected_state.keys())
    for name, value in expected_state.items():
        assert state[name].dtype == value.dtype, name
        assert torch.equal(state[name], value), name
    # Same nn code, same weights: bitwise equal outputs.
    src, tgt, kwargs = make_inputs("transformer", True, "causal+padding", torch.float64)
    assert torch.equal(
        run("transformer", model, src, tgt, kwargs), run("transformer", original, src, tgt, kwargs)
    )


def test_swapped_encoder_scripts() -> None:
    reference = make_model("encoder", True, True, torch.float64)
    ours = torch_mha.swap_attention(reference, inplace=False).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "'norm' was found in ScriptModule constants"
        scripted = torch.jit.script(ours)
    assert str(scripted.inlined_graph).count("torch_mha::multi_head_attention") == LAYERS
    src, _, kwargs = make_inputs("encoder", True, "causal+padding", torch.float64)
    torch.testing.assert_close(scripted(src, **kwargs), reference(src, **kwargs), **F64)


# ---------------------------------------------------------------------------------------------
# PyTorch's inference fast path reads the attention module's weights itself


def op_names(fn: Callable[[], Tensor]) -> Tuple[Tensor, List[str]]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, [event.name() for event in prof.profiler.kineto_results.events()]


@pytest.mark.parametrize("padding", [False, True], ids=["dense", "nested"])
def test_fast_path_still_works_on_a_swapped_encoder(padding: bool) -> None:
    """In eval under no_grad, nn.TransformerEncoderLayer runs torch._transformer_encoder_layer_fwd
    with the attention module's weights (and with a padding mask nn.TransformerEncoder turns the
    input into a NestedTensor first). A swapped model must take that path too, unchanged."""
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.0, batch_first=True)
    reference = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=True).eval()
    ours = torch_mha.swap_attention(reference, inplace=False).model
    x = torch.randn(BATCH, SRC_LEN, D_MODEL)
    pad = padding_mask([SRC_LEN, 5, 3], SRC_LEN) if padding else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        expected = reference(x, src_key_padding_mask=pad)
        fast, names = op_names(lambda: ours(x, src_key_padding_mask=pad))
    assert "aten::_transformer_encoder_layer_fwd" in names
    assert not [name for name in names if name.startswith("torch_mha::")]
    assert torch.equal(fast, expected)  # same native kernel, same weights
    # With gradients enabled the same model runs torch_mha (padded rows aside, where the fast
    # path writes zeros), and agrees with the fast path.
    slow, names = op_names(lambda: ours(x, src_key_padding_mask=pad))
    assert "torch_mha::multi_head_attention" in names
    keep = ~pad if pad is not None else torch.ones(BATCH, SRC_LEN, dtype=torch.bool)
    torch.testing.assert_close(slow.detach()[keep], fast[keep], **F32)


def test_hook_on_swapped_attention_in_an_eval_encoder_with_padding() -> None:
    """nn.TransformerEncoder decides to build a NestedTensor before its layers decide whether
    they can take the fast path; a forward hook on the attention module turns the layer's fast
    path off, so the attention module itself receives the NestedTensor. nn.MultiheadAttention
    handles it (its own fast path); a drop-in replacement must too."""
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.0, batch_first=True)
    reference = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=True).eval()
    ours = torch_mha.swap_attention(reference, inplace=False).model
    x = torch.randn(BATCH, SRC_LEN, D_MODEL)
    pad = padding_mask([SRC_LEN, 5, 3], SRC_LEN)
    results = []
    for model in (reference, ours):
        seen: List[bool] = []
        model.layers[0].self_attn.register_forward_hook(lambda m, a, o: seen.append(True))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(model(x, src_key_padding_mask=pad))
        assert seen == [True]
    keep = ~pad
    torch.testing.assert_close(results[1][keep], results[0][keep], **F32)


# ---------------------------------------------------------------------------------------------
# The swap helper on hand-built models


class ThirdPartyBlock(nn.Module):
    """A block from someone else's library: holds an attention module as a plain attribute."""

    def __init__(self, attn: nn.Module, width: int) -> None:
        super().__init__()
        self.attn = attn
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.proj(out) + x


class Zoo(nn.Module):
    """Attention modules in every kind of place and configuration, one of them shared."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.MultiheadAttention(16, 2, batch_first=True)
        self.first = ThirdPartyBlock(shared, 16)
        self.second = ThirdPartyBlock(shared, 16)  # the same attention module again
        self.stack = nn.ModuleList(
            [
                nn.MultiheadAttention(16, 4, kdim=8, vdim=12),  # separate projections
                nn.MultiheadAttention(16, 4, bias=False, batch_first=True),
            ]
        )
        self.table = nn.ModuleDict(
            {"cross": nn.MultiheadAttention(16, 2, add_bias_kv=True, add_zero_attn=True)}
        )
        self.seq = nn.Sequential(ThirdPartyBlock(nn.MultiheadAttention(16, 8, 0.25), 16))
        self.head = nn.Linear(16, 16, bias=False)
        self.head.weight = self.first.attn.out_proj.weight  # a weight tied across modules

    def forward(self, x: Tensor, memory_k: Tensor, memory_v: Tensor) -> Tensor:
        x = self.second(self.first(x))
        seq_first = x.transpose(0, 1)
        y, _ = self.stack[0](seq_first, memory_k, memory_v)
        x = x + y.transpose(0, 1)
        x = x + self.stack[1](x, x, x, need_weights=False)[0]
        z, _ = self.table["cross"](x.transpose(0, 1), seq_first, seq_first)
        x = x + z.transpose(0, 1)
        return self.head(self.seq(x))


ZOO_NAMES = ["first.attn", "stack.0", "stack.1", "table.cross", "seq.0.attn"]


def zoo_inputs() -> Tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    return x, torch.randn(4, 2, 8, dtype=torch.float64), torch.randn(4, 2, 12, dtype=torch.float64)


def test_zoo_swap_report_and_parity() -> None:
    reference = Zoo().double()
    reference.seq[0].attn.eval()  # a module in another mode than its parent
    reference.stack[1].in_proj_weight.requires_grad_(False)  # a frozen weight
    ours = copy.deepcopy(reference)
    report = torch_mha.swap_attention(ours)

    assert report.names == ZOO_NAMES
    assert report.swapped[0].aliases == ("second.attn",)
    assert ours.first.attn is ours.second.attn
    assert ours.head.weight is ours.first.attn.out_proj.weight
    configs = {entry.name: entry.config for entry in report.swapped}
    assert configs["stack.0"] == torch_mha.AttentionConfig(
        16, 4, 0.0, True, False, False, 8, 12, False
    )
    assert configs["stack.1"].bias is False and configs["stack.1"].batch_first is True
    assert configs["table.cross"].add_bias_kv and configs["table.cross"].add_zero_attn
    assert configs["seq.0.attn"].dropout == 0.25
    assert all(entry.dtype == torch.float64 for entry in report.swapped)
    text = str(report)
    assert (
        "replaced 5 torch.nn.MultiheadAttention modules with torch_mha.MultiheadAttention" in text
    )
    assert "first.attn (also second.attn)" in text and "kdim=8, vdim=12" in text

    for name, module in ours.named_modules():
        ref_module = reference.get_submodule(name)
        assert module.training == ref_module.training, name
        if name in ZOO_NAMES:
            assert type(module) is torch_mha.MultiheadAttention, name
    assert ours.seq[0].attn.training is False and ours.training is True
    assert not ours.stack[1].in_proj_weight.requires_grad

    # Training mode, dropout 0.25 in an eval-mode module: deterministic, comparable.
    inputs = zoo_inputs()
    weight = torch.randn(2, 5, 16, dtype=torch.float64)
    grads = []
    for model in (reference, ours):
        model.zero_grad(set_to_none=True)
        out = model(*inputs)
        (out * weight).sum().backward()
        grads.append(({n: p.grad for n, p in model.named_parameters()}, out.detach()))
    torch.testing.assert_close(grads[1][1], grads[0][1], **F64)
    assert_same_gradients(grads[1][0], grads[0][0], F64)
    assert ours.stack[1].in_proj_weight.grad is None


def test_swap_keeps_parameter_identity_ties_and_grads() -> None:
    model = Zoo()
    before = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    model(*(t.float() for t in zoo_inputs())).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch_mha.swap_attention(model)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters())


def test_swap_does_not_draw_random_numbers() -> None:
    model = make_model("transformer", True, False, torch.float32)
    state = torch.get_rng_state()
    torch_mha.swap_attention(model)
    torch_mha.restore_attention(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_not_inplace_leaves_the_model_untouched() -> None:
    model = Zoo()
    state = copy.deepcopy(model.state_dict())
    params = [id(p) for p in model.parameters()]
    report = torch_mha.swap_attention(model, inplace=False)
    assert report.model is not model
    assert len(attention_modules(model, nn.MultiheadAttention)) == 5
    assert not attention_modules(model, torch_mha.MultiheadAttention)
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    copied = report.model
    assert len(attention_modules(copied, torch_mha.MultiheadAttention)) == 5
    assert not {id(p) for p in copied.parameters()} & set(params)
    assert copied.head.weight is copied.first.attn.out_proj.weight  # ties survive the copy


def test_root_module_and_hooks_and_attributes() -> None:
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    attn.note = "kept"  # an attribute someone's code reads
    calls: List[int] = []
    handle = attn.register_forward_hook(lambda m, a, o: calls.append(1))
    report = torch_mha.swap_attention(attn)
    new = report.model  # a module cannot replace itself: the replacement is in the report
    assert type(new) is torch_mha.MultiheadAttention and type(attn) is nn.MultiheadAttention
    assert report.names == [""] and "<model>" in str(report)
    assert report.swapped[0].hooks_moved == 1 and report.swapped[0].attributes_moved == ("note",)
    assert new.note == "kept"
    x = torch.randn(2, 3, 8)
    new(x, x, x)
    assert calls == [1]
    handle.remove()
    new(x, x, x)
    assert calls == [1]


def test_meta_device_model() -> None:
    model = make_model("encoder", True, False, torch.float32).to("meta")
    report = torch_mha.swap_attention(model)
    assert {entry.device for entry in report.swapped} == {torch.device("meta")}
    assert all(p.is_meta for p in model.parameters())


def test_subclasses_are_skipped_and_reported() -> None:
    class CustomAttention(nn.MultiheadAttention):
        pass

    model = nn.ModuleDict({"plain": nn.MultiheadAttention(8, 2), "custom": CustomAttention(8, 2)})
    report = torch_mha.swap_attention(model)
    assert report.names == ["plain"]
    assert report.skipped == [
        ("custom", "CustomAttention is a subclass of torch.nn.MultiheadAttention")
    ]
    assert type(model["custom"]) is CustomAttention
    assert "skipped custom" in str(report)


def test_errors_name_the_argument_and_the_module() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        torch_mha.swap_attention([nn.MultiheadAttention(8, 2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="restore_attention: model must be a torch.nn.Module"):
        torch_mha.restore_attention("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inplace must be a bool"):
        torch_mha.swap_attention(nn.Linear(2, 2), inplace="yes")  # type: ignore[arg-type]
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="TorchScript module"):
        torch_mha.swap_attention(scripted)
    # nn accepts dropout=1.0; torch_mha does not, and the error says which module.
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, dropout=1.0))
    with pytest.raises(ValueError, match=r"cannot replace 1 \(MultiheadAttention\).*dropout"):
        torch_mha.swap_attention(model)
    assert type(model[1]) is nn.MultiheadAttention  # nothing was half-done
    # Extra registered state on the attention module (here: a weight-norm parametrization's
    # leftovers would look the same) is refused rather than dropped.
    attn = nn.MultiheadAttention(8, 2)
    attn.register_buffer("scale", torch.ones(1))
    with pytest.raises(ValueError, match="scale"):
        torch_mha.swap_attention(attn)


# ---------------------------------------------------------------------------------------------
# Heads are independent: a head-sharded (tensor-parallel) layer, simulated in one process


def test_head_sharded_tensor_parallel_simulation() -> None:
    """Two "ranks" each own half of the heads: the q, k and v rows of in_proj for those heads
    and the matching columns of out_proj. Each computes its heads with torch_mha.attention and
    a partial output projection; summing the partials (the all-reduce) plus the bias gives the
    full layer's output, and each shard's gradients are the matching slices of the full ones."""
    E, H, ranks = D_MODEL, HEADS, 2
    D = E // H
    full = torch_mha.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        full.in_proj_bias.normal_()
        full.out_proj.bias.normal_()
    x = torch.randn(BATCH, SRC_LEN, E, dtype=torch.float64, requires_grad=True)
    causal = torch.ones(SRC_LEN, SRC_LEN, dtype=torch.bool).triu(1)
    weight = torch.randn(BATCH, SRC_LEN, E, dtype=torch.float64)
    out, _ = full(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    (out * weight).sum().backward()

    heads_per_rank = H // ranks
    partials: List[Tensor] = []
    shards: List[Tuple[Tensor, Tensor, Tensor, List[int], List[int]]] = []
    x_grads: List[Tensor] = []
    for rank in range(ranks):
        cols = list(range(rank * heads_per_rank * D, (rank + 1) * heads_per_rank * D))
        rows = [part * E + c for part in range(3) for c in cols]  # q, k and v rows
        w_in = full.in_proj_weight.detach()[rows].clone().requires_grad_()
        b_in = full.in_proj_bias.detach()[rows].clone().requires_grad_()
        w_out = full.out_proj.weight.detach()[:, cols].clone().requires_grad_()
        x_rank = x.detach().clone().requires_grad_()  # each rank holds the full input
        q, k, v = nn.functional.linear(x_rank, w_in, b_in).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads_per_rank, D)).transpose(1, 2) for t in (q, k, v))
        heads, _ = torch_mha.attention(q, k, v, is_causal=True)
        partial = nn.functional.linear(heads.transpose(1, 2).flatten(2), w_out)
        partials.append(partial)
        shards.append((w_in, b_in, w_out, rows, cols))
        x_grads.append(x_rank)
    sharded = torch.stack(partials).sum(0) + full.out_proj.bias.detach()  # all-reduce + bias
    (sharded * weight).sum().backward()

    torch.testing.assert_close(sharded, out.detach(), **F64)
    for w_in, b_in, w_out, rows, cols in shards:
        torch.testing.assert_close(w_in.grad, full.in_proj_weight.grad[rows], **F64)
        torch.testing.assert_close(b_in.grad, full.in_proj_bias.grad[rows], **F64)
        torch.testing.assert_close(w_out.grad, full.out_proj.weight.grad[:, cols], **F64)
    # The input gradient is all-reduced too (the sum of the ranks' contributions).
    x_grad = torch.stack([t.grad for t in x_grads]).sum(0)
    torch.testing.assert_close(x_grad, x.grad, **F64)
