"""Contrastive losses between a speech sequence and its transcript (arXiv 2412.15712): pure tensor functions.

The faithful default, per hidden-state layer `l` of the frozen LLM:

1. `mean_pool` the text hidden states (transcript tokens only) and the speech hidden states (projector output only)
   over their valid positions;
2. `info_nce`: L2-normalise both, `S = text @ speech.T / tau` with `tau = 0.1`, cross-entropy of `S` against
   `arange(B)`: one direction, text queries against speech keys, negatives from the same micro-batch;
3. `summed_layer_loss`: the per-layer losses over `contrastive_layer_indices` are SUMMED, not averaged.

The Wasserstein variant (`wasserstein_contrastive_loss`) L2-normalises every token's vector, then compares the whole
sequences at the embedding level with a debiased Sinkhorn divergence (`sinkhorn_distance`) and uses `-distance / tau`
as logits.

Opt-in departures from the original, all off by default: `symmetric=True` (adds the speech -> text direction),
`LearnableTemperature` (CLIP-style learned tau) and `gather_negatives=True` (negatives from every process).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Hidden-state indices of the original "all" set for a 32-layer LLM are the multiples of this step, then the last.
_ALL_LAYERS_STEP_AT_32 = 5


@dataclass
class ContrastiveOutput:
    """What a contrastive loss returns.

    Attributes:
        loss: Scalar loss to back-propagate.
        logits: `(B, B_keys)` text -> speech logits (similarity / tau, or -distance / tau), rows are the text
            queries; for logging and heat maps. `B_keys = B` unless negatives were gathered across processes.
        targets: `(B,)` column of the positive key of each row of `logits`.
    """

    loss: Tensor
    logits: Tensor
    targets: Tensor


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of each sequence over its valid positions.

    Args:
        hidden: `(B, L, D)` hidden states.
        mask: `(B, L)` validity mask (bool or 0/1); padded positions never contribute, whatever they hold.

    Returns:
        `(B, D)` pooled vectors, in the dtype of `hidden`.

    Raises:
        ValueError: On mismatched shapes, or if a row has no valid position (its mean does not exist).
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"mean_pool expects hidden (B, L, D) and mask (B, L); got {hidden.shape} and {mask.shape}.")
    valid = mask.bool()  # (B, L)
    counts = valid.sum(dim=1, keepdim=True)  # (B, 1)
    empty = (counts.squeeze(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mean_pool: rows {empty} have no valid position.")
    # masked_fill rather than multiplying by the mask: padding may hold non-finite values, and 0 * nan = nan.
    summed = hidden.masked_fill(~valid.unsqueeze(-1), 0).sum(dim=1)  # (B, D)
    return summed / counts.to(hidden.dtype)


def contrastive_layer_indices(num_hidden_layers: int, spec: str | int | Sequence[int] = "all") -> list[int]:
    """Hidden-state indices the contrastive loss is computed at.

    Indices follow HF `output_hidden_states`: 0 is the embedding level (for the speech branch, the projector output,
    where the LLM is not run at all) and `num_hidden_layers` is the last state, after the final norm.

    `"all"` is the original set {0, 5, 10, 15, 20, 25, 32} of a 32-layer LLM, spaced the same way for other depths
    and always ending at the last state: with `step = max(1, round_half_up(5 * N / 32))`, the multiples of `step`
    from 0 up to `N - step` (the last spaced index stays a full step below N: for N = 32, 25 is in and 30 is not),
    then N.

    ====  ====  ===================================
    N     step  "all"
    ====  ====  ===================================
    2     1     [0, 1, 2]
    16    3     [0, 3, 6, 9, 12, 16]
    32    5     [0, 5, 10, 15, 20, 25, 32]
    40    6     [0, 6, 12, 18, 24, 30, 40]
    80    13    [0, 13, 26, 39, 52, 65, 80]
    ====  ====  ===================================

    Args:
        num_hidden_layers: Number of decoder layers N of the LLM (`config.num_hidden_layers`).
        spec: `"all"`; a single index `k` with `-(N + 1) <= k <= N` (negative counts from the end, -1 is the last
            state); a sequence of such indices; or a string of comma-separated indices (`"0"`, `"0,32"`), for
            command lines and YAML.

    Returns:
        Sorted indices without duplicates.

    Raises:
        ValueError: If N < 1, the spec is empty or malformed, or an index is out of range.
    """
    if isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be a positive int; got {num_hidden_layers!r}.")
    n = num_hidden_layers
    if isinstance(spec, str):
        if spec.strip() == "all":
            step = max(1, math.floor(_ALL_LAYERS_STEP_AT_32 * n / 32 + 0.5))
            return [*range(0, n - step + 1, step), n]
        try:
            spec = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f"layer spec must be 'all', an index or comma-separated indices; got {spec!r}.") from None
    requested = [spec] if isinstance(spec, numbers.Integral) else list(spec)
    if not requested:
        raise ValueError("layer spec is empty: give 'all', an index or a non-empty list of indices.")
    indices = set()
    for index in requested:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(f"layer indices must be ints; got {index!r}.")
        index = int(index)
        if not -(n + 1) <= index <= n:
            raise ValueError(
                f"layer index {index} is out of range for an LLM with {n} layers: valid hidden-state indices are "
                f"0..{n} (or {-(n + 1)}..-1 counted from the end)."
            )
        indices.add(index % (n + 1))
    return sorted(indices)


def summed_layer_loss(per_layer: Mapping[int, Tensor]) -> Tensor:
    """Total contrastive loss: the per-layer losses SUMMED, as in the original (not averaged over layers).

    Args:
        per_layer: Scalar loss per hidden-state index.

    Raises:
        ValueError: If `per_layer` is empty.
    """
    if not per_layer:
        raise ValueError("summed_layer_loss needs at least one layer's loss.")
    return torch.stack(list(per_layer.values())).sum()


def _check_temperature(temperature: float | Tensor) -> None:
    # A tensor temperature (learned) is left unchecked: reading its value would synchronise with the device.
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive; got {temperature}.")


def similarity(text: Tensor, speech: Tensor, temperature: float | Tensor = 0.1) -> Tensor:
    """Cosine similarities divided by the temperature: the InfoNCE logits.

    Computed in (at least) float32: at 1 / tau = 10, bfloat16 logits would keep about two significant digits.

    Args:
        text: `(B_q, D)` query embeddings (rows of the result).
        speech: `(B_k, D)` key embeddings (columns of the result).
        temperature: tau > 0, a float or a scalar tensor (e.g. from `LearnableTemperature`).

    Returns:
        `(B_q, B_k)` logits `normalize(text) @ normalize(speech).T / tau`.
    """
    _check_temperature(temperature)
    dtype = torch.promote_types(text.dtype, torch.float32)
    text = F.normalize(text.to(dtype), dim=-1)  # (B_q, D)
    speech = F.normalize(speech.to(dtype), dim=-1)  # (B_k, D)
    return text @ speech.T / temperature  # (B_q, B_k)


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns to each process the sum of every process's gradient for its rows.

    Written on the public `all_gather` / `all_reduce` (gloo and NCCL): `torch.distributed.nn.functional.all_gather`
    does the same but is deprecated in torch 2.13, and its replacement is private and missing from older torch.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, batch_sizes: tuple[int, ...]) -> Tensor:
        rank = dist.get_rank()
        ctx.rows = slice(sum(batch_sizes[:rank]), sum(batch_sizes[: rank + 1]))
        # all_gather needs equal shapes: pad every shard to the largest batch, trim after.
        padded = tensor.new_zeros((max(batch_sizes), *tensor.shape[1:]))  # (max B_r, ...)
        padded[: tensor.shape[0]] = tensor
        shards = [torch.empty_like(padded) for _ in batch_sizes]
        dist.all_gather(shards, padded)
        return torch.cat([shard[:size] for shard, size in zip(shards, batch_sizes)])  # (B_g, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()  # (B_g, ...); all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rows], None


def gather_batch_sizes(local_batch_size: int, device: torch.device | str | None = None) -> list[int]:
    """Batch size of every process, in rank order; `[local_batch_size]` when not distributed.

    Args:
        local_batch_size: This process's batch size.
        device: Device of the small tensor exchanged (must suit the backend: CUDA for NCCL).
    """
    _, world_size = _rank_and_world_size()
    if world_size == 1:
        return [local_batch_size]
    size = torch.tensor([local_batch_size], device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def gather_with_grad(tensor: Tensor, batch_sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenates every process's `(B_r, ...)` tensor along dim 0, in rank order, keeping the gradient.

    Without `torch.distributed` initialised, or with one process, returns `tensor` itself.

    Gradient: the backward of the gather sums, over all processes, the gradient each one computed for a shard and
    delivers the sum to the shard's owner. So the owner's gradient accounts for its rows serving as negatives in
    the other processes' losses, which a plain `all_gather` with the local shard put back in its slot would drop.
    See `info_nce` for how the loss must be scaled for DDP's gradient averaging to give the global-batch gradient.

    Args:
        tensor: `(B_r, ...)` local shard; the batch sizes may differ between processes (shards are padded to the
            largest for the collective, then trimmed).
        batch_sizes: Every process's batch size, as from `gather_batch_sizes`; gathered here when None.

    Returns:
        `(sum(batch_sizes), ...)` global tensor.
    """
    _, world_size = _rank_and_world_size()
    if world_size == 1:
        return tensor
    if batch_sizes is None:
        batch_sizes = gather_batch_sizes(tensor.shape[0], tensor.device)
    return _GatherWithGrad.apply(tensor, tuple(batch_sizes))


def global_targets(batch_sizes: Sequence[int], rank: int, device: torch.device | str | None = None) -> Tensor:
    """Positive columns of this process's queries in the gathered key matrix.

    Rows of the logits are the `batch_sizes[rank]` local queries, columns all `sum(batch_sizes)` gathered keys in
    rank order, so local query `i` matches global key `sum(batch_sizes[:rank]) + i`.

    Args:
        batch_sizes: Every process's batch size, in rank order.
        rank: This process's rank.
        device: Device of the result.

    Returns:
        `(batch_sizes[rank],)` int64 targets.
    """
    offset = sum(batch_sizes[:rank])
    return torch.arange(offset, offset + batch_sizes[rank], device=device)


def info_nce(
    text: Tensor,
    speech: Tensor,
    temperature: float | Tensor = 0.1,
    symmetric: bool = False,
    gather_negatives: bool = False,
) -> ContrastiveOutput:
    """InfoNCE between pooled text and speech embeddings; text `i` and speech `i` are the positive pair.

    Faithful default: one direction, text -> speech (rows of `S = T @ S^T / tau` are the text queries), mean
    cross-entropy against `arange(B)`, negatives from this micro-batch only.

    `symmetric=True` (a departure from the original) averages this with the speech -> text direction, as in CLIP.

    `gather_negatives=True` (a departure from the original) uses every process's speech rows as keys when
    `torch.distributed` runs with more than one process. Let process r hold B_r local queries, B_g = sum_r B_r,
    and let l_i be the cross-entropy of global query i over all B_g keys. The single-process loss over the global
    batch is L = (1 / B_g) sum_i l_i. Each process computes L_r = (W / B_g) sum_{i local to r} l_i (the local mean
    when the B_r are equal), so that (1 / W) sum_r L_r = L. The gather is differentiable (`gather_with_grad`): the
    gradient process r's shard receives is sum_q dL_q / d(shard r), and DDP then averages the parameter gradients,
    (1 / W) sum_r, which gives exactly dL / dtheta. Hence: local query rows, no extra factor of W, and the loss to
    log is the mean of L_r over processes (what the HF Trainer logs). Computing all B_g query rows on every process
    would be W times the work; scaling the loss by W would only be right with a gather that does not send
    gradients back to the owner.

    Args:
        text: `(B, D)` pooled text embeddings (queries).
        speech: `(B, D)` pooled speech embeddings (keys).
        temperature: tau > 0, a float or a scalar tensor (e.g. from `LearnableTemperature`).
        symmetric: Also use the speech -> text direction and average the two losses.
        gather_negatives: Draw negatives from all processes; a no-op without `torch.distributed`.

    Returns:
        `ContrastiveOutput` with the loss, the `(B, B_keys)` text -> speech logits and their targets.
    """
    if text.dim() != 2 or text.shape != speech.shape:
        raise ValueError(
            f"info_nce expects text and speech of the same shape (B, D); got {text.shape}, {speech.shape}."
        )
    batch_size = text.shape[0]
    rank, world_size = _rank_and_world_size() if gather_negatives else (0, 1)
    batch_sizes = gather_batch_sizes(batch_size, text.device) if world_size > 1 else [batch_size]
    targets = global_targets(batch_sizes, rank, text.device)  # (B,)
    # W / B_g == 1 / B without gathering: the mean cross-entropy of the original.
    scale = world_size / sum(batch_sizes)

    def direction(queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        keys = gather_with_grad(keys, batch_sizes) if world_size > 1 else keys  # (B_g, D)
        logits = similarity(queries, keys, temperature)  # (B, B_g)
        return F.cross_entropy(logits, targets, reduction="sum") * scale, logits

    loss, logits = direction(text, speech)
    if symmetric:
        loss = (loss + direction(speech, text)[0]) / 2
    return ContrastiveOutput(loss=loss, logits=logits, targets=targets)


class LearnableTemperature(nn.Module):
    """CLIP-style learned temperature (an opt-in departure: the original fixes tau = 0.1).

    Stores `log(1 / tau)`, so that the optimiser works on the log of the logit scale, initialised at `init`. The
    returned tau is clamped to `[min_value, max_value]` (CLIP caps 1 / tau at 100, i.e. tau >= 0.01); the clamp
    acts on the output, so the parameter gets no gradient while it is past a bound. Add the module to the optimiser
    and the checkpoint together with the projector.

    Args:
        init: Initial tau.
        min_value: Smallest tau returned.
        max_value: Largest tau returned.
    """

    def __init__(self, init: float = 0.1, min_value: float = 0.01, max_value: float = 1.0) -> None:
        super().__init__()
        if not 0 < min_value <= init <= max_value:
            raise ValueError(f"need 0 < min_value <= init <= max_value; got {min_value}, {init}, {max_value}.")
        self.min_value = min_value
        self.max_value = max_value
        self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1 / init)))

    def forward(self) -> Tensor:
        """Returns the current tau as a scalar tensor."""
        log_inv = self.log_inv_temperature.clamp(math.log(1 / self.max_value), math.log(1 / self.min_value))
        return torch.exp(-log_inv)


def _epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    # geomloss's `epsilon_schedule`, verbatim in effect (same numpy arange, hence the same number of steps).
    steps = np.arange(p * np.log(diameter), p * np.log(blur), p * np.log(scaling))
    return [diameter**p] + [float(np.exp(e)) for e in steps] + [blur**p]


def _cost(x: Tensor, y: Tensor, p: int, pairs: str) -> Tensor:
    """Ground cost ||x - y||^p / p (geomloss's: squared distances / 2 for p = 2, distances for p = 1).

    `pairs="all"`: x `(Bx, N, D)`, y `(By, M, D)` -> `(Bx, By, N, M)`, every sequence of x against every one of y.
    `pairs="same"`: x `(B, N, D)`, y `(B, M, D)` -> `(B, N, M)`, sequence b against sequence b.
    """
    if pairs == "all":
        dots = torch.einsum("ind,jmd->ijnm", x, y)  # (Bx, By, N, M), one matmul
        x2 = x.pow(2).sum(-1)[:, None, :, None]  # (Bx, 1, N, 1)
        y2 = y.pow(2).sum(-1)[None, :, None, :]  # (1, By, 1, M)
    else:
        dots = torch.einsum("bnd,bmd->bnm", x, y)  # (B, N, M)
        x2 = x.pow(2).sum(-1)[:, :, None]  # (B, N, 1)
        y2 = y.pow(2).sum(-1)[:, None, :]  # (B, 1, M)
    squared = x2 - 2 * dots + y2
    if p == 2:
        return squared / 2
    # As geomloss: the clamp keeps sqrt's gradient finite at zero distance.
    return torch.sqrt(torch.clamp_min(squared, 1e-8))


def _softmin(eps: Tensor, cost: Tensor, h: Tensor) -> Tensor:
    """Soft c-transform f_i = -eps log sum_j exp(h_j - C_ij / eps); eps (..., 1), cost (..., N, M), h (..., M)."""
    return -eps * torch.logsumexp(h.unsqueeze(-2) - cost / eps.unsqueeze(-1), dim=-1)  # (..., N)


def _pair_diameters(x: Tensor, x_valid: Tensor, y: Tensor, y_valid: Tensor) -> Tensor:
    """geomloss's `max_diameter` for every pair: diagonal of the bounding box of both sets of valid points."""
    inf = torch.finfo(x.dtype).max
    x_min = x.masked_fill(~x_valid[..., None], inf).amin(dim=1)  # (Bx, D)
    x_max = x.masked_fill(~x_valid[..., None], -inf).amax(dim=1)  # (Bx, D)
    y_min = y.masked_fill(~y_valid[..., None], inf).amin(dim=1)  # (By, D)
    y_max = y.masked_fill(~y_valid[..., None], -inf).amax(dim=1)  # (By, D)
    lows = torch.minimum(x_min[:, None], y_min[None])  # (Bx, By, D)
    highs = torch.maximum(x_max[:, None], y_max[None])  # (Bx, By, D)
    return (highs - lows).norm(dim=-1)  # (Bx, By)


def sinkhorn_distance(
    x: Tensor,
    x_mask: Tensor,
    y: Tensor,
    y_mask: Tensor,
    p: int = 2,
    blur: float = 0.05,
    scaling: float = 0.5,
    diameter: float | None = None,
) -> Tensor:
    """Debiased Sinkhorn divergence between every sequence of `x` and every sequence of `y`, all pairs at once.

    Each sequence is a uniform measure over its valid positions (masked positions get zero weight). The result
    reproduces, pair by pair, geomloss's `SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling)` applied to the
    two unpadded sequences, which is what the original computed in a Python loop over the B x B pairs:

    - cost C(x, y) = ||x - y||^p / p, i.e. ||x - y||^2 / 2 for p = 2;
    - entropic regularisation epsilon = blur^p (0.0025 at the defaults);
    - debiased divergence S(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2, so S(a, a) = 0 and two
      single points give exactly ||a - b||^p / p (no entropic bias: the only transport plan is the product);
    - epsilon-scaling (annealing): epsilon starts at d^p, d = the diagonal of the bounding box of the pair's valid
      points (or `diameter`), and shrinks by `scaling^p` per iteration down to blur^p, i.e.
      `2 + ceil(log(d / blur) / log(1 / scaling))` symmetrised log-domain Sinkhorn iterations (10 for d = 10 at
      the defaults). Like geomloss this is a heuristic, not a solve to a tolerance: annealing gives a close
      approximation in few iterations, and the result depends only on the schedule, never on the batch. Pairs
      with shorter schedules wait (their potentials stay unchanged) until their schedule starts;
    - gradients by the envelope theorem, as geomloss: the iterations run without autograd and one last
      extrapolation step, differentiable in the points, yields the gradients (memory does not grow with the
      iterations).

    A pair whose points all coincide (d = 0, where geomloss divides by zero) starts at epsilon = blur^p instead.
    Computed in (at least) float32.

    Args:
        x: `(Bx, N, D)` first sequences (rows of the result).
        x_mask: `(Bx, N)` validity mask of `x`.
        y: `(By, M, D)` second sequences (columns of the result).
        y_mask: `(By, M)` validity mask of `y`.
        p: Exponent of the ground cost, 1 or 2 (geomloss's dense backend supports these two).
        blur: Target blur scale; epsilon = blur^p.
        scaling: Ratio between successive blur scales in the annealing, in (0, 1); closer to 1 is slower and
            more accurate.
        diameter: Starting blur scale for every pair; None estimates it per pair, as geomloss does.

    Returns:
        `(Bx, By)` divergences.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2; got {p}.")
    if blur <= 0 or not 0 < scaling < 1:
        raise ValueError(f"need blur > 0 and 0 < scaling < 1; got blur={blur}, scaling={scaling}.")
    for name, seq, mask in (("x", x, x_mask), ("y", y, y_mask)):
        if seq.dim() != 3 or mask.shape != seq.shape[:2]:
            raise ValueError(f"{name} must be (B, L, D) with a (B, L) mask; got {seq.shape} and {mask.shape}.")
        empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"sinkhorn_distance: rows {empty} of {name} have no valid position.")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same feature size; got {x.shape[-1]} and {y.shape[-1]}.")

    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x_valid, y_valid = x_mask.bool(), y_mask.bool()
    # Zeroing padding keeps garbage (even non-finite) out of the costs; its weight is zero anyway.
    x = x.to(dtype).masked_fill(~x_valid[..., None], 0)  # (Bx, N, D)
    y = y.to(dtype).masked_fill(~y_valid[..., None], 0)  # (By, M, D)
    a_log = torch.log(x_valid.to(dtype) / x_valid.sum(1, keepdim=True))[:, None]  # (Bx, 1, N), -inf on padding
    b_log = torch.log(y_valid.to(dtype) / y_valid.sum(1, keepdim=True))[None]  # (1, By, M)

    with torch.no_grad():
        if diameter is None:
            diameters = _pair_diameters(x, x_valid, y, y_valid).tolist()
        else:
            diameters = [[diameter] * y.shape[0] for _ in range(x.shape[0])]
        schedules = [[_epsilon_schedule(p, d if d > 0 else blur, blur, scaling) for d in row] for row in diameters]
        steps = max(len(s) for row in schedules for s in row)
        # Left-pad every schedule to a common length with its first value; padded steps leave the potentials as
        # they are, so each pair runs exactly its own schedule.
        eps_all = torch.tensor(
            [[[s[0]] * (steps - len(s)) + s for s in row] for row in schedules], dtype=dtype, device=x.device
        ).permute(2, 0, 1)[..., None]  # (K, Bx, By, 1)
        lengths = torch.tensor([[len(s) for s in row] for row in schedules], device=x.device)  # (Bx, By)
        active = (torch.arange(steps, device=x.device)[:, None, None] >= steps - lengths)[..., None]  # (K, Bx, By, 1)

        c_xy = _cost(x, y, p, "all")  # (Bx, By, N, M)
        c_yx = c_xy.transpose(-1, -2)  # (Bx, By, M, N)
        c_xx = _cost(x, x, p, "same")[:, None]  # (Bx, 1, N, N)
        c_yy = _cost(y, y, p, "same")[None]  # (1, By, M, M)

        eps = eps_all[0]  # (Bx, By, 1)
        f_ba = _softmin(eps, c_xy, b_log)  # (Bx, By, N): OT(a, b), potential on x
        g_ab = _softmin(eps, c_yx, a_log)  # (Bx, By, M): OT(a, b), potential on y
        f_aa = _softmin(eps, c_xx, a_log)  # (Bx, By, N): OT(a, a)
        g_bb = _softmin(eps, c_yy, b_log)  # (Bx, By, M): OT(b, b)
        for eps, step_active in zip(eps_all, active):
            # Jacobi updates averaged with the previous potentials (geomloss's symmetrised Sinkhorn).
            ft_ba = _softmin(eps, c_xy, b_log + g_ab / eps)
            gt_ab = _softmin(eps, c_yx, a_log + f_ba / eps)
            ft_aa = _softmin(eps, c_xx, a_log + f_aa / eps)
            gt_bb = _softmin(eps, c_yy, b_log + g_bb / eps)
            f_ba = torch.where(step_active, (f_ba + ft_ba) / 2, f_ba)
            g_ab = torch.where(step_active, (g_ab + gt_ab) / 2, g_ab)
            f_aa = torch.where(step_active, (f_aa + ft_aa) / 2, f_aa)
            g_bb = torch.where(step_active, (g_bb + gt_bb) / 2, g_bb)

    # Last extrapolation with gradients; detaching one side of each cost, as geomloss does, makes the gradient in
    # each point cloud flow through its own potential only (the envelope theorem's formula).
    eps = eps_all[-1]  # (Bx, By, 1): blur^p for every pair
    f_ba, g_ab, f_aa, g_bb = (
        _softmin(eps, _cost(x, y.detach(), p, "all"), b_log + g_ab / eps),
        _softmin(eps, _cost(y, x.detach(), p, "all").transpose(0, 1), a_log + f_ba / eps),
        _softmin(eps, _cost(x, x.detach(), p, "same")[:, None], a_log + f_aa / eps),
        _softmin(eps, _cost(y, y.detach(), p, "same")[None], b_log + g_bb / eps),
    )
    return (a_log.exp() * (f_ba - f_aa)).sum(-1) + (b_log.exp() * (g_ab - g_bb)).sum(-1)  # (Bx, By)


def _unit_tokens(seq: Tensor, mask: Tensor) -> Tensor:
    """`(B, L, D)` -> each valid token's vector L2-normalised in (at least) float32, padding zero. Padding is zeroed
    before normalising: a non-finite value there would otherwise reach the gradient through the norm."""
    dtype = torch.promote_types(seq.dtype, torch.float32)
    return F.normalize(seq.to(dtype).masked_fill(~mask.bool()[..., None], 0), dim=-1)


def wasserstein_contrastive_loss(
    text_seq: Tensor,
    text_mask: Tensor,
    speech_seq: Tensor,
    speech_mask: Tensor,
    temperature: float | Tensor = 0.1,
    **sinkhorn_kwargs,
) -> ContrastiveOutput:
    """The Wasserstein variant: logits = -Sinkhorn divergence / tau over all B x B pairs, cross-entropy text -> speech.

    The original used it at the embedding level only (token embeddings of the transcript against the projector
    output), with p = 2 and blur = 0.05, the defaults of `sinkhorn_distance`. As there, every token's vector is first
    L2-normalised in (at least) float32 on both sides: the point clouds lie on the unit sphere, so blur = 0.05 is on
    that scale, and the divergence compares directions, not the norms, which differ between token embeddings and
    projector outputs. Between unit vectors ||t - s||^2 / 2 = 1 - cos(t, s), so two single tokens give exactly
    one minus their cosine similarity.

    Args:
        text_seq: `(B, M, D)` text sequences (queries).
        text_mask: `(B, M)` validity mask of `text_seq`.
        speech_seq: `(B, N, D)` speech sequences (keys).
        speech_mask: `(B, N)` validity mask of `speech_seq`.
        temperature: tau > 0, a float or a scalar tensor.
        **sinkhorn_kwargs: Passed to `sinkhorn_distance` (`p`, `blur`, `scaling`, `diameter`).

    Returns:
        `ContrastiveOutput` with the loss, the `(B, B)` logits and the targets `arange(B)`.
    """
    if text_seq.shape[0] != speech_seq.shape[0]:
        raise ValueError(f"text and speech batch sizes differ: {text_seq.shape[0]} vs {speech_seq.shape[0]}.")
    _check_temperature(temperature)
    text_seq, speech_seq = _unit_tokens(text_seq, text_mask), _unit_tokens(speech_seq, speech_mask)
    distances = sinkhorn_distance(text_seq, text_mask, speech_seq, speech_mask, **sinkhorn_kwargs)  # (B, B)
    logits = -distances / temperature  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    return ContrastiveOutput(loss=F.cross_entropy(logits, targets), logits=logits, targets=targets)


__all__ = [
    "ContrastiveOutput",
    "mean_pool",
    "contrastive_layer_indices",
    "summed_layer_loss",
    "similarity",
    "info_nce",
    "LearnableTemperature",
    "gather_batch_sizes",
    "gather_with_grad",
    "global_targets",
    "sinkhorn_distance",
    "wasserstein_contrastive_loss",
]
