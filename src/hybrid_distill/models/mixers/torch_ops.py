"""Plain-PyTorch gated delta rule and gated linear attention: the CPU twins of fla's kernels.

Layout follows fla: q, k [B, T, H, K]; v [B, T, H, V]; state [B, H, K, V]. Queries are scaled inside, keys
and queries arrive already normalised (GDN) or raw (GLA). Each op has a chunked form (training, prefill) and
a token-by-token recurrent form (decoding and the exact reference the tests compare against).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in float32, rounded once to x's dtype: fla's l2norm formula (its
    GatedDeltaNet layers normalise q and k with it), so its kernels and this twin compute the same function."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def _pad_time(tensor: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 1 to a multiple; zero keys, values, gates and betas leave the state untouched."""
    pad = (-tensor.shape[1]) % multiple
    if pad == 0:
        return tensor
    widths = [0, 0] * (tensor.dim() - 2) + [0, pad]
    return F.pad(tensor, widths)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 at least (the state accumulates over the whole sequence), fp64 when the inputs are fp64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _to_chunks(tensor: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...]."""
    batch, length, heads = tensor.shape[:3]
    chunked = tensor.reshape(batch, length // chunk_size, chunk_size, heads, *tensor.shape[3:])
    return chunked.transpose(1, 3).transpose(2, 3)


def gated_delta_rule_recurrent(q, k, v, g, beta, scale, initial_state=None, output_final_state=False):
    """S_t = e^{g_t} S_{t-1} + k_t beta_t (v_t - (e^{g_t} S_{t-1})^T k_t)^T, o_t = S_t^T (scale q_t)."""
    batch, length, heads, key_dim = q.shape
    dt = _compute_dtype(v)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dt)
    if initial_state is not None:
        state = initial_state.to(dt)
    outputs = []
    for t in range(length):
        q_t, k_t, v_t = q[:, t].to(dt) * scale, k[:, t].to(dt), v[:, t].to(dt)
        state = state * g[:, t].to(dt).exp()[..., None, None]
        delta = (v_t - torch.einsum("bhkv,bhk->bhv", state, k_t)) * beta[:, t].to(dt)[..., None]
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, delta)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t))
    output = torch.stack(outputs, dim=1).to(v.dtype)
    return output, (state if output_final_state else None)


def gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state=None, output_final_state=False, chunk_size=64):
    """Same function as the recurrence, computed chunk-parallel with the WY form (a triangular solve per chunk)."""
    length, out_dtype, dt = q.shape[1], v.dtype, _compute_dtype(v)
    q, k, v, g, beta = (_pad_time(x.to(dt), chunk_size) for x in (q, k, v, g, beta))
    q, k, v = (_to_chunks(x, chunk_size) for x in (q, k, v))            # [B, H, N, C, D]
    g, beta = (_to_chunks(x, chunk_size) for x in (g, beta))            # [B, H, N, C]
    q = q * scale
    g_cum = g.cumsum(-1)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    strictly_causal = causal.clone().fill_diagonal_(False)
    decay_diff = g_cum[..., :, None] - g_cum[..., None, :]
    decay = decay_diff.masked_fill(~causal, float("-inf")).exp()       # e^{G_i - G_j}, j <= i
    key_gram = k @ k.transpose(-1, -2)
    lower = (beta[..., None] * key_gram * decay).masked_fill(~strictly_causal, 0.0)
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    system = eye + lower
    values_new_base = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    state_weights = torch.linalg.solve_triangular(
        system, (beta * g_cum.exp())[..., None] * k, upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay

    batch, heads, num_chunks = q.shape[:3]
    state = q.new_zeros(batch, heads, k.shape[-1], v.shape[-1])
    if initial_state is not None:
        state = initial_state.to(dt)
    outputs = []
    for n in range(num_chunks):
        values_new = values_new_base[:, :, n] - state_weights[:, :, n] @ state
        inter = (q[:, :, n] * g_cum[:, :, n, :, None].exp()) @ state
        outputs.append(inter + scores[:, :, n] @ values_new)
        last = g_cum[:, :, n, -1]
        carried = (k[:, :, n] * (last[..., None] - g_cum[:, :, n]).exp()[..., None]).transpose(-1, -2)
        state = state * last.exp()[..., None, None] + carried @ values_new
    output = torch.stack(outputs, dim=2)                                 # [B, H, N, C, V]
    output = output.flatten(2, 3).transpose(1, 2)[:, :length].to(out_dtype)
    return output, (state if output_final_state else None)


def gla_recurrent(q, k, v, gk, scale, initial_state=None, output_final_state=False):
    """S_t = diag(e^{gk_t}) S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t)."""
    batch, length, heads, key_dim = q.shape
    dt = _compute_dtype(v)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dt)
    if initial_state is not None:
        state = initial_state.to(dt)
    outputs = []
    for t in range(length):
        q_t, k_t, v_t = q[:, t].to(dt) * scale, k[:, t].to(dt), v[:, t].to(dt)
        state = state * gk[:, t].to(dt).exp()[..., None] + torch.einsum("bhk,bhv->bhkv", k_t, v_t)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t))
    output = torch.stack(outputs, dim=1).to(v.dtype)
    return output, (state if output_final_state else None)


def gla_chunked(q, k, v, gk, scale, initial_state=None, output_final_state=False, chunk_size=16):
    """Chunk-parallel GLA; pairwise per-channel decays are formed explicitly so no exp can overflow."""
    length, out_dtype, dt = q.shape[1], v.dtype, _compute_dtype(v)
    q, k, v, gk = (_pad_time(x.to(dt), chunk_size) for x in (q, k, v, gk))
    q, k, v, gk = (_to_chunks(x, chunk_size) for x in (q, k, v, gk))  # [B, H, N, C, D]
    q = q * scale
    g_cum = gk.cumsum(-2)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay_diff = g_cum[..., :, None, :] - g_cum[..., None, :, :]       # [B, H, N, C, C, K]
    decay = decay_diff.masked_fill(~causal[..., None], float("-inf")).exp()
    scores = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, decay)

    batch, heads, num_chunks = q.shape[:3]
    state = q.new_zeros(batch, heads, k.shape[-1], v.shape[-1])
    if initial_state is not None:
        state = initial_state.to(dt)
    outputs = []
    for n in range(num_chunks):
        inter = (q[:, :, n] * g_cum[:, :, n].exp()) @ state
        outputs.append(inter + scores[:, :, n] @ v[:, :, n])
        last = g_cum[:, :, n, -1]                                       # [B, H, K]
        carried = (k[:, :, n] * (last[:, :, None] - g_cum[:, :, n]).exp()).transpose(-1, -2)
        state = state * last.exp()[..., None] + carried @ v[:, :, n]
    output = torch.stack(outputs, dim=2).flatten(2, 3).transpose(1, 2)[:, :length].to(out_dtype)
    return output, (state if output_final_state else None)
