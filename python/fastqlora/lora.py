"""LoRA adapters: ``y = base(x) + s·(dropout(x)·Aᵀ)·Bᵀ`` with ``s = alpha/r`` (or
``alpha/√r`` for rsLoRA), initialized as PEFT does (A Kaiming-uniform, B zero).

Adapters attach to the model's frozen projections (``FrozenLinear.adapter``) and to
the embedding table. Their parameters are fp32 master weights; the forward casts to
the activations' dtype. This module also names them the way PEFT does, so adapters
save to and load from PEFT's format, and merges them into 16-bit weights.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.dropout import lora_dropout

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OTHER_TARGETS = ("embed_tokens", "lm_head")
FUSED_TARGETS = ("qkv_proj", "gate_up_proj")  # Phi-3's fused projections
# a fused projection and the projections it holds: one adapter serves them together
_FUSED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PEFT_PREFIX = "base_model.model."


# Bumped by each model forward (CausalLM.forward): an adapter's 16-bit copies of A and B
# (cast_weights) serve one forward, its recomputation and its backward, then are cast anew.
_cast_epoch = 0


def next_cast_epoch() -> None:
    """Start a new forward: adapters cast their weights again at their next use."""
    global _cast_epoch
    _cast_epoch += 1


def _stackable(group: list[LoraAdapter]) -> bool:
    a0 = group[0].lora_A
    return len(group) > 1 and all(ad.lora_A.shape[1] == a0.shape[1] and ad.lora_A.device == a0.device
                                  for ad in group)


def cast_all(adapters: list[LoraAdapter], dtype: torch.dtype,
             groups: list[list[LoraAdapter]] | None = None) -> None:
    """Cast every adapter's A and B to ``dtype`` for this forward in one multi-tensor copy
    (a few launches for the whole model instead of two an adapter); ``cast_weights`` then
    finds them cast. ``groups``: adapters of projections that read the same input (q, k, v;
    gate, up), whose A are written stacked into one ``[Σr, K]`` tensor (each adapter's A a
    row block of it), what :func:`cast_group` returns. Fresh tensors every time: the last
    forward's copies may still be saved for its backward."""
    todo = [ad for ad in adapters if ad.lora_A.dtype != dtype or ad.lora_B.dtype != dtype]
    if not todo:
        return
    waiting = {id(ad) for ad in todo}
    srcs: list[torch.Tensor] = []
    dsts: list[torch.Tensor] = []
    a_of: dict[int, torch.Tensor] = {}
    stacks = []
    for g in groups or []:
        if _stackable(g) and all(id(ad) in waiting for ad in g):
            a_cat = torch.empty(sum(ad.lora_A.shape[0] for ad in g), g[0].lora_A.shape[1], dtype=dtype,
                                device=g[0].lora_A.device)
            for ad, rows in zip(g, a_cat.split([ad.lora_A.shape[0] for ad in g])):
                a_of[id(ad)] = rows
            stacks.append((g, a_cat))
    for ad in todo:
        a = ad.lora_A
        if id(ad) not in a_of:
            a_of[id(ad)] = torch.empty(a.shape, dtype=dtype, device=a.device)
        srcs += [a.detach(), ad.lora_B.detach()]
        dsts += [a_of[id(ad)], torch.empty(ad.lora_B.shape, dtype=dtype, device=ad.lora_B.device)]
    with torch.no_grad():
        torch._foreach_copy_(dsts, srcs)
    for i, ad in enumerate(todo):
        ad._cast = (ad._cast_key(dtype), dsts[2 * i], dsts[2 * i + 1])
    for g, a_cat in stacks:
        g[0]._cast_cat = (tuple(ad._cast_key(dtype) for ad in g), a_cat)


def cast_group(adapters: list[LoraAdapter], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the adapters' A stacked ``[Σr, K]``, their B) in ``dtype`` for this forward: what
    :func:`cast_all` wrote when it was told the group, else cast and stacked here (and kept
    for the recomputation and the backward)."""
    if not adapters:
        raise ValueError("cast_group needs at least one adapter")
    keys = tuple(ad._cast_key(dtype) for ad in adapters)
    pairs = [ad.cast_weights(dtype) for ad in adapters]
    hit = getattr(adapters[0], "_cast_cat", None)
    if hit is not None and hit[0] == keys:
        return hit[1], [b for _, b in pairs]
    with torch.no_grad():
        a_cat = torch.cat([a for a, _ in pairs])
    adapters[0]._cast_cat = (keys, a_cat)
    return a_cat, [b for _, b in pairs]


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraAdapter(nn.Module):
    """The low-rank branch of one projection: A ``[r, in]``, B ``[out, r]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        self.dropout_p = dropout
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        # PEFT's default init: A as nn.Linear's kaiming_uniform(a=√5), B zero so the
        # adapter starts as the identity change.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._cast: tuple | None = None

    def _cast_key(self, dtype: torch.dtype) -> tuple:
        a, b = self.lora_A, self.lora_B
        return (dtype, _cast_epoch, a._version, b._version, a.data_ptr(), b.data_ptr())

    def cast_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in ``dtype``, detached: cast once and reused by the forward, the
        checkpointed recomputation and the backward of one model forward (each cast is a
        kernel launch, and a training step is launch-bound on small models). Cast again
        after the next model forward starts, or when A or B changed in place (the
        optimizer's step bumps their version counters) or moved."""
        a, b = self.lora_A, self.lora_B
        key = self._cast_key(dtype)
        hit = getattr(self, "_cast", None)  # absent on adapters pickled before it existed
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        with torch.no_grad():
            ac, bc = a.detach().to(dtype), b.detach().to(dtype)
        self._cast = (key, ac, bc)
        return ac, bc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = lora_dropout(x, self.dropout_p, self.training)
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return F.linear(F.linear(h, a), b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` in fp32: what merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout_p}"


class LoraEmbeddingAdapter(nn.Module):
    """LoRA on an embedding table, PEFT's form: ``Δ = s·E_A[ids]·Bᵀ`` with
    ``lora_embedding_A [r, vocab]`` (zero-initialized) and ``lora_embedding_B [dim, r]``
    (normal-initialized)."""

    def __init__(self, num_embeddings: int, dim: int, r: int, alpha: float, use_rslora: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, device=device))
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        after_a = F.embedding(ids, self.lora_embedding_A.t())
        return (after_a @ self.lora_embedding_B.t()).to(dtype) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t() * self.scale


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(module path, host module, adapter) for every attached adapter."""
    for name, module in model.named_modules():
        adapter = getattr(module, "adapter", None)
        if isinstance(adapter, (LoraAdapter, LoraEmbeddingAdapter)):
            yield name, module, adapter


def validate_targets(target_modules: Iterable[str] | str) -> list[str]:
    if isinstance(target_modules, str):
        target_modules = (
            list(LINEAR_TARGETS) if target_modules in ("all-linear", "all") else [target_modules]
        )
    targets = list(dict.fromkeys(target_modules))
    allowed = LINEAR_TARGETS + FUSED_TARGETS + OTHER_TARGETS
    unknown = [t for t in targets if t not in allowed]
    if unknown:
        raise ValueError(f"unknown target_modules {unknown}; choose from {list(allowed)} or 'all-linear'")
    if not targets:
        raise ValueError("target_modules is empty: name at least one projection, e.g. ['q_proj', 'v_proj']")
    return targets


def targets_for(model: nn.Module, targets: list[str]) -> list[str]:
    """``targets`` in the model's own projection names: a model with fused projections
    (Phi-3) takes q/k/v as ``qkv_proj`` and gate/up as ``gate_up_proj`` (all of a group or
    none: one adapter spans the fused output); the others take the fused names apart."""
    fused = bool(getattr(getattr(model, "cfg", None), "fused_projections", False))
    out: list[str] = []
    for name in targets:
        group = next((g for g, parts in _FUSED_GROUPS.items() if name in parts), None)
        if fused and group is not None:
            missing = [p for p in _FUSED_GROUPS[group] if p not in targets]
            if missing:
                raise ValueError(f"this model computes {', '.join(_FUSED_GROUPS[group])} as one projection "
                                 f"({group}): target all of them (or {group}), not {name} without {missing}")
            name = group
        elif not fused and name in _FUSED_GROUPS:
            out.extend(_FUSED_GROUPS[name])
            continue
        out.append(name)
    return list(dict.fromkeys(out))


def attach_lora(
    model: nn.Module,
    target_modules: Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    seed: int | None = None,
) -> list[str]:
    """Attach a fresh adapter to each targeted module; returns their paths.

    Targeted modules must expose an ``adapter`` slot (the model's FrozenLinear and
    Embedding modules do). Adapters are created on the host module's device."""
    targets = set(targets_for(model, validate_targets(target_modules)))
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    attached = []
    try:
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in targets or not hasattr(module, "adapter"):
                continue
            device = _module_device(module)
            if isinstance(module, nn.Embedding) or leaf == "embed_tokens":
                module.adapter = LoraEmbeddingAdapter(
                    module.num_embeddings, module.embedding_dim, r, alpha, use_rslora, device=device
                )
            else:
                module.adapter = LoraAdapter(
                    module.in_features, module.out_features, r, alpha, dropout, use_rslora, device=device
                )
            attached.append(name)
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    missing = targets - {n.rsplit(".", 1)[-1] for n in attached}
    if missing:
        raise ValueError(f"target_modules {sorted(missing)} match no module of this model")
    return attached


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return t.device
    return torch.device("cpu")


def peft_key(model: nn.Module, name: str) -> str:
    """PEFT's key prefix for module ``name`` of ``model``: inside an image-text model (Gemma 3)
    the text model's modules sit under ``model.language_model``, as transformers names them."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "wrapper", None) and name.startswith("model."):
        name = "model.language_model." + name[len("model."):]
    return PEFT_PREFIX + name


def module_name_from_peft(model: nn.Module, key: str) -> str:
    """The inverse of :func:`peft_key` (also for transformers 4's ``language_model.model.``)."""
    name = key.removeprefix(PEFT_PREFIX)
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "wrapper", None):
        for prefix in ("model.language_model.", "language_model.model."):
            if name.startswith(prefix):
                return "model." + name[len(prefix):]
        if name.startswith("language_model.lm_head"):
            return name.removeprefix("language_model.")
    return name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's key names."""
    out: dict[str, torch.Tensor] = {}
    for name, _, adapter in iter_adapters(model):
        key = peft_key(model, name)
        if isinstance(adapter, LoraAdapter):
            out[f"{key}.lora_A.weight"] = adapter.lora_A.detach()
            out[f"{key}.lora_B.weight"] = adapter.lora_B.detach()
        else:
            out[f"{key}.lora_embedding_A"] = adapter.lora_embedding_A.detach()
            out[f"{key}.lora_embedding_B"] = adapter.lora_embedding_B.detach()
    return out


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "") -> None:
    """Copy PEFT-named adapter tensors into the attached adapters; every adapter must be
    covered and every LoRA tensor used."""
    where = f" in {source}" if source else ""
    expected = adapter_state_dict(model)
    lora_keys = {k for k in tensors if ".lora_" in k}
    # PEFT sometimes writes the adapter name into the key (".lora_A.default.weight"), and
    # adapters of an image-text model may use either transformers version's module paths.
    normalized = {peft_key(model, module_name_from_peft(model, k.replace(".default.weight", ".weight")
                                                        .replace(".default", ""))): k for k in lora_keys}
    missing = [k for k in expected if k not in normalized]
    if missing:
        raise ValueError(f"adapter tensor {missing[0]} is missing{where} ({len(missing)} missing in all)")
    unused = [normalized[k] for k in normalized if k not in expected]
    if unused:
        raise ValueError(f"adapter tensor {unused[0]}{where} matches no LoRA module of this model")
    params = dict(_adapter_params(model))
    with torch.no_grad():
        for key, target in params.items():
            src = tensors[normalized[key]]
            if tuple(src.shape) != tuple(target.shape):
                raise ValueError(
                    f"adapter tensor {normalized[key]}{where} has shape {tuple(src.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(src.to(target.dtype))


def _adapter_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, _, adapter in iter_adapters(model):
        key = peft_key(model, name)
        if isinstance(adapter, LoraAdapter):
            yield f"{key}.lora_A.weight", adapter.lora_A
            yield f"{key}.lora_B.weight", adapter.lora_B
        else:
            yield f"{key}.lora_embedding_A", adapter.lora_embedding_A
            yield f"{key}.lora_embedding_B", adapter.lora_embedding_B
