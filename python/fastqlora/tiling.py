"""Per-token functions over long sequences in tiles, so their intermediates exist for one tile
at a time (the MLP's gate/up/activation, the lm_head's logits and the loss).

``tiled_apply(fn, x)`` treats ``x`` as rows of tokens (all dims but the last) and requires
``fn`` to act on each row independently. With grad, only x and y are stored: backward
recomputes each tile with grad on and backpropagates it.

Backward, for tiles t with x_t its rows, y_t = fn(x_t; θ) and g_t = ∂L/∂y_t:
    (∂L/∂x_t, ∂L/∂θ|_t) = vjp(fn(x_t; θ) recomputed, (x_t, θ), g_t)
    ∂L/∂x = concat_t ∂L/∂x_t,      ∂L/∂θ = Σ_t ∂L/∂θ|_t
Saved: x, the aux tensors (labels...), θ, the RNG/autocast state at the start of the forward
(tiles replay in forward order, so dropout draws the same masks). The parameter gradient is a sum over tiles, so it
differs from the untiled one by float rounding only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .recompute import ReplayState

DEFAULT_TILE_BUDGET = 1 << 30  # bytes of intermediates one tile may hold
TILE_MULTIPLE = 256  # tiles a multiple of this many tokens keep the matmuls efficient


def choose_tile_tokens(tokens: int, bytes_per_token: int, budget_bytes: int = DEFAULT_TILE_BUDGET,
                       multiple: int = TILE_MULTIPLE) -> int:
    """Tokens per tile so one tile's intermediates fit ``budget_bytes`` (at least ``multiple``;
    ``tokens`` itself when everything fits, meaning: no tiling)."""
    if bytes_per_token <= 0 or budget_bytes <= 0:
        raise ValueError(f"bytes_per_token and budget_bytes must be > 0, got {bytes_per_token} and {budget_bytes}")
    tile = budget_bytes // bytes_per_token
    if tile >= tokens:
        return tokens
    return max(tile // multiple * multiple, multiple)


def _rows(x: torch.Tensor, aux: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x as (rows, features) and each aux tensor as (rows, ...), sharing x's token dims."""
    lead = x.shape[:-1]
    for a in aux:
        if a.shape[:len(lead)] != lead:
            raise ValueError(f"tiled_apply: aux tensor of shape {tuple(a.shape)} does not start with x's token "
                             f"dims {tuple(lead)}")
    rows = x.numel() // x.shape[-1]
    return x.reshape(rows, x.shape[-1]), [a.reshape(rows, *a.shape[len(lead):]) for a in aux]


def _run_tiles(fn: Callable, x2: torch.Tensor, aux2: Sequence[torch.Tensor], tile: int) -> torch.Tensor:
    rows = x2.shape[0]
    first = fn(x2[:tile], *(a[:tile] for a in aux2))
    if not isinstance(first, torch.Tensor) or first.shape[:1] != (min(tile, rows),):
        raise ValueError("tiled_apply: fn must map an (n, features) tile to a tensor with n rows, got "
                         f"{getattr(first, 'shape', type(first).__name__)} for n={min(tile, rows)}")
    y = first.new_empty((rows, *first.shape[1:]))
    y[:tile] = first
    del first
    for s in range(tile, rows, tile):
        y[s:s + tile] = fn(x2[s:s + tile], *(a[s:s + tile] for a in aux2))
    return y


class _TiledApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, tile: int, n_aux: int, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.tile, ctx.n_aux = fn, tile, n_aux
        ctx.replay = ReplayState(x)
        ctx.save_for_backward(x, *rest)
        x2, aux2 = _rows(x, rest[:n_aux])
        y = _run_tiles(fn, x2, aux2, tile)
        return y.reshape(*x.shape[:-1], *y.shape[1:])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, *rest = ctx.saved_tensors
        fn, tile, n_aux = ctx.fn, ctx.tile, ctx.n_aux
        params = rest[n_aux:]
        need_x, need_p = ctx.needs_input_grad[3], ctx.needs_input_grad[4 + n_aux:]
        x2, aux2 = _rows(x, rest[:n_aux])
        rows = x2.shape[0]
        g2 = grad_y.reshape(rows, -1)
        grad_x = torch.empty_like(x2) if need_x else None
        grad_p: list[torch.Tensor | None] = [None] * len(params)
        wanted_p = [j for j, n in enumerate(need_p) if n]
        with ctx.replay.rng():
            for s in range(0, rows, tile):
                xt = x2[s:s + tile].detach().requires_grad_(need_x)
                with torch.enable_grad(), ctx.replay.autocast():
                    yt = fn(xt, *(a[s:s + tile] for a in aux2))
                wanted = ([xt] if need_x else []) + [params[j] for j in wanted_p]
                gy = g2[s:s + tile].reshape(yt.shape)
                grads = list(torch.autograd.grad(yt, wanted, gy, allow_unused=True)) if yt.requires_grad else []
                if need_x:
                    gx = grads.pop(0) if grads else None
                    if gx is None:
                        grad_x[s:s + tile].zero_()
                    else:
                        grad_x[s:s + tile] = gx
                for j, g in zip(wanted_p, grads):
                    if g is not None:
                        grad_p[j] = g if grad_p[j] is None else grad_p[j] + g
        return (None, None, None, None if grad_x is None else grad_x.view_as(x), *([None] * n_aux), *grad_p)


def tiled_apply(fn: Callable[..., torch.Tensor], x: torch.Tensor, tile_tokens: int | None = None, *,
                aux: Sequence[torch.Tensor] = (), params: Sequence[torch.Tensor] | None = None,
                bytes_per_token: int | None = None, budget_bytes: int = DEFAULT_TILE_BUDGET) -> torch.Tensor:
    """``fn(x, *aux)`` computed over tiles of ``tile_tokens`` tokens, storing only x and y.

    ``fn`` must be per-token: row r of its output depends on row r of its inputs alone.
    ``aux``: per-token tensors without gradient (labels, say) whose leading dims are x's
    token dims; they are tiled alongside x. The output has x's token dims, then fn's own.
    ``params``: the tensors fn uses that need gradients (default: fn's trainable parameters
    when fn is an nn.Module). ``tile_tokens=None`` picks the tile from ``bytes_per_token``
    (fn's intermediates per token; default 16 x hidden x element size, about a SwiGLU MLP's
    with its gradients) and ``budget_bytes``. One tile covering everything calls fn directly.
    """
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"tiled_apply: x must have a non-empty last (feature) dim, got shape {tuple(x.shape)}")
    rows = x.numel() // x.shape[-1]
    if tile_tokens is None:
        per_token = bytes_per_token if bytes_per_token is not None else 16 * x.shape[-1] * x.element_size()
        tile_tokens = choose_tile_tokens(rows, per_token, budget_bytes)
    tile = int(tile_tokens)
    if tile < 1:
        raise ValueError(f"tiled_apply: tile_tokens must be >= 1, got {tile_tokens}")
    aux = tuple(aux)
    if any(a.requires_grad for a in aux):
        raise ValueError("tiled_apply: aux tensors get no gradient; pass tensors that need one as x or params")
    if tile >= rows:
        return fn(x, *aux)
    if params is None:
        params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, nn.Module) else []
    params = tuple(params)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        x2, aux2 = _rows(x, aux)
        y = _run_tiles(fn, x2, aux2, tile)  # nothing to differentiate: just tile
        return y.reshape(*x.shape[:-1], *y.shape[1:])
    return _TiledApply.apply(fn, tile, len(aux), x, *aux, *params)
