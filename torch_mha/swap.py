"""Swap torch.nn.MultiheadAttention for torch_mha.MultiheadAttention inside a model, and back.

    report = torch_mha.swap_attention(model)        # in place; print(report) lists what changed
    report = torch_mha.restore_attention(model)     # back to torch.nn.MultiheadAttention

Every module whose type is exactly the source class is replaced wherever the model holds it: as
an attribute of any module (nn.TransformerEncoderLayer.self_attn, a third-party block's
``attn``), inside nn.ModuleList / nn.ModuleDict / nn.Sequential, or as the model itself. The
replacement gets the same configuration, and the *same* Parameter objects and the same
``out_proj`` submodule: values, dtype, device, requires_grad, ``.grad``, weights tied to other
modules and the references an optimizer or a DDP wrapper holds are all kept (the key set is
checked with ``load_state_dict(strict=True)``, which copies nothing because source and
destination are the same tensors). Training mode, forward/backward/state-dict hooks and extra
attributes set on the old module move too. A module reachable under several names (shared) maps
to one replacement. Subclasses of the source class are left alone and listed as skipped: they
may change what forward does.

Swap before wrapping the model in DistributedDataParallel or torch.compile, and before
scripting it. An optimizer created before an in-place swap keeps working (it holds the same
Parameter objects, so its state is untouched); with ``inplace=False`` the model is deep-copied
first, the copy has new Parameters, so create the optimizer from ``report.model``.
"""

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

from .modules import MultiheadAttention

__all__ = [
    "AttentionConfig",
    "SwapReport",
    "SwappedAttention",
    "restore_attention",
    "swap_attention",
]

# Per-module hook registries of nn.Module; they move with the module so that registered hooks
# (and the handles that remove them) keep working after a swap.
_HOOK_ATTRIBUTES: Tuple[str, ...] = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_CALL_HOOK_ATTRIBUTES: Tuple[str, ...] = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)


@dataclass(frozen=True)
class AttentionConfig:
    """Constructor arguments of a multi-head attention module (both classes take the same)."""

    embed_dim: int
    num_heads: int
    dropout: float
    bias: bool
    add_bias_kv: bool
    add_zero_attn: bool
    kdim: int
    vdim: int
    batch_first: bool

    @staticmethod
    def of(module: nn.Module) -> "AttentionConfig":
        return AttentionConfig(
            embed_dim=int(module.embed_dim),
            num_heads=int(module.num_heads),
            dropout=float(module.dropout),
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=bool(module.add_zero_attn),
            kdim=int(module.kdim),
            vdim=int(module.vdim),
            batch_first=bool(module.batch_first),
        )

    def __str__(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        parts.append(f"dropout={self.dropout!r}")
        if not self.bias:
            parts.append("bias=False")
        if self.add_bias_kv:
            parts.append("add_bias_kv=True")
        if self.add_zero_attn:
            parts.append("add_zero_attn=True")
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        parts.append(f"batch_first={self.batch_first}")
        return ", ".join(parts)


@dataclass(frozen=True)
class SwappedAttention:
    """One replaced module: every qualified name it was reachable under, and what it was."""

    name: str
    aliases: Tuple[str, ...]
    config: AttentionConfig
    dtype: Optional[torch.dtype]
    device: Optional[torch.device]
    training: bool
    hooks_moved: int
    attributes_moved: Tuple[str, ...]
    module: nn.Module = field(repr=False, compare=False)

    def __str__(self) -> str:
        where = self.name or "<model>"
        if self.aliases:
            where += " (also " + ", ".join(self.aliases) + ")"
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        notes = [dtype, str(self.device), "train" if self.training else "eval"]
        if self.hooks_moved:
            notes.append(f"{self.hooks_moved} hook(s) moved")
        if self.attributes_moved:
            notes.append("attributes moved: " + ", ".join(self.attributes_moved))
        return f"{where}: {self.config} [{', '.join(notes)}]"


@dataclass
class SwapReport:
    """What swap_attention / restore_attention did. ``model`` is the model that now holds the
    replacements: the argument itself when swapped in place, else the deep copy (and, when the
    model itself was an attention module, its replacement)."""

    model: nn.Module = field(repr=False)
    source: str
    target: str
    swapped: List[SwappedAttention]
    skipped: List[Tuple[str, str]]

    @property
    def names(self) -> List[str]:
        return [entry.name for entry in self.swapped]

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        count = len(self.swapped)
        lines = [
            f"replaced {count} {self.source} module{'' if count == 1 else 's'} "
            f"with {self.target}" + (":" if count or self.skipped else "")
        ]
        lines.extend(f"  {entry}" for entry in self.swapped)
        lines.extend(f"  skipped {name or '<model>'}: {why}" for name, why in self.skipped)
        return "\n".join(lines)


def swap_attention(model: nn.Module, *, inplace: bool = True) -> SwapReport:
    """Replaces every torch.nn.MultiheadAttention in ``model`` with torch_mha.MultiheadAttention.

    Keeps configuration, Parameter objects (so weights, dtype, device, requires_grad, tied
    weights and optimizer references), training mode and hooks; see the module docstring. With
    ``inplace=False`` the model is deep-copied first and left untouched. Returns a SwapReport;
    ``report.model`` is the swapped model.
    """
    return _swap(model, inplace, nn.MultiheadAttention, MultiheadAttention, "swap_attention")


def restore_attention(model: nn.Module, *, inplace: bool = True) -> SwapReport:
    """Replaces every torch_mha.MultiheadAttention in ``model`` with torch.nn.MultiheadAttention
    (the inverse of swap_attention, with the same guarantees)."""
    return _swap(model, inplace, MultiheadAttention, nn.MultiheadAttention, "restore_attention")


def _qualified(cls: Type[nn.Module]) -> str:
    module = "torch.nn" if cls is nn.MultiheadAttention else "torch_mha"
    return f"{module}.{cls.__name__}"


def _swap(
    model: nn.Module,
    inplace: bool,
    source: Type[nn.Module],
    target: Callable[..., nn.Module],
    caller: str,
) -> SwapReport:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{caller}: model is a TorchScript module ({type(model).__name__}); swap the "
            "attention modules of the Python model, then script it"
        )
    if not isinstance(inplace, bool):
        raise TypeError(f"{caller}: inplace must be a bool, got {type(inplace).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    # Every slot (parent module, child key) holding a source module, and every qualified name
    # under which each source module is reachable. remove_duplicate=False walks shared modules
    # under each of their names, as state_dict does.
    names: Dict[int, List[str]] = {}
    found: List[nn.Module] = []
    slots: List[Tuple[nn.Module, str, nn.Module]] = []
    seen_slots: Dict[Tuple[int, str], bool] = {}
    skipped: List[Tuple[str, str]] = []
    skipped_ids: Dict[int, bool] = {}

    def visit(name: str, module: nn.Module) -> None:
        if type(module) is source:
            if id(module) not in names:
                names[id(module)] = []
                found.append(module)
            if name not in names[id(module)]:
                names[id(module)].append(name)
        elif isinstance(module, source) and id(module) not in skipped_ids:
            skipped_ids[id(module)] = True
            skipped.append((name, f"{type(module).__name__} is a subclass of {_qualified(source)}"))

    for prefix, module in model.named_modules(remove_duplicate=False):
        visit(prefix, module)
        for key, child in module._modules.items():
            if type(child) is source and (id(module), key) not in seen_slots:
                seen_slots[(id(module), key)] = True
                slots.append((module, key, child))

    replacements: Dict[int, nn.Module] = {}
    swapped: List[SwappedAttention] = []
    for old in found:
        qualified = names[id(old)]
        new, hooks, attributes = _replacement(old, target, caller, qualified[0])
        replacements[id(old)] = new
        weight = next(iter(new.parameters()), None)
        swapped.append(
            SwappedAttention(
                name=qualified[0],
                aliases=tuple(qualified[1:]),
                config=AttentionConfig.of(new),
                dtype=weight.dtype if weight is not None else None,
                device=weight.device if weight is not None else None,
                training=new.training,
                hooks_moved=hooks,
                attributes_moved=attributes,
                module=new,
            )
        )
    for parent, key, old in slots:
        parent._modules[key] = replacements[id(old)]
    if id(model) in replacements:
        model = replacements[id(model)]
    return SwapReport(
        model=model,
        source=_qualified(source),
        target=_qualified(target),  # type: ignore[arg-type]
        swapped=swapped,
        skipped=skipped,
    )


def _replacement(
    old: nn.Module, target: Callable[..., nn.Module], caller: str, name: str
) -> Tuple[nn.Module, int, Tuple[str, ...]]:
    """Builds the target module around old's Parameters and out_proj; returns it, the number of
    hooks moved and the names of the extra attributes moved."""
    where = f"{caller}: cannot replace {name or 'the model'} ({type(old).__name__})"
    config = AttentionConfig.of(old)
    out_proj = old.out_proj
    if not isinstance(out_proj, nn.Linear):
        raise ValueError(f"{where}: out_proj is a {type(out_proj).__name__}, not an nn.Linear")
    try:
        # On the meta device: no memory, no initialisation work and no draws from torch's
        # random generator (a swap must not change the random stream of the program).
        new = target(
            config.embed_dim,
            config.num_heads,
            dropout=config.dropout,
            bias=config.bias,
            add_bias_kv=config.add_bias_kv,
            add_zero_attn=config.add_zero_attn,
            kdim=config.kdim,
            vdim=config.vdim,
            batch_first=config.batch_first,
            device="meta",
        )
    except (ValueError, AssertionError) as error:
        raise ValueError(f"{where}: {error}") from error

    extra_children = set(old._modules) - set(new._modules)
    extra_params = set(old._parameters) - set(new._parameters)
    extra_buffers = set(old._buffers)
    if extra_children or extra_params or extra_buffers:
        extra = sorted(extra_children | extra_params | extra_buffers)
        raise ValueError(
            f"{where}: it holds parameters, buffers or submodules that a freshly built module "
            f"has not ({', '.join(extra)}); remove them (or parametrizations) before swapping"
        )
    for key, param in old._parameters.items():
        new.register_parameter(key, param)
    new.out_proj = out_proj
    try:
        # Source and destination are the same tensors, so this copies nothing; it checks
        # the key set and shapes exactly as loading a checkpoint would.
        new.load_state_dict(old.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{where}: state_dict does not match: {error}") from error
    new.training = old.training

    hooks = 0
    for attribute in _HOOK_ATTRIBUTES:
        if attribute in old.__dict__:
            value = old.__dict__[attribute]
            if attribute in _CALL_HOOK_ATTRIBUTES:
                hooks += len(value)
            new.__dict__[attribute] = value
    moved: List[str] = []
    for attribute, value in old.__dict__.items():
        if attribute not in new.__dict__:
            new.__dict__[attribute] = value
            moved.append(attribute)
    return new, hooks, tuple(moved)
