"""Contrastive losses (methods.md, section A): hand-computed InfoNCE values, layer sets, learnable temperature,
gathered negatives against the doubled batch, and the vectorised Sinkhorn divergence against a per-pair loop."""

import gc
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from speechllm_hf.training import contrastive_losses as cl
from speechllm_hf.training.contrastive_losses import (
    LearnableTemperature,
    contrastive_layer_indices,
    gather_batch_sizes,
    gather_with_grad,
    global_targets,
    info_nce,
    mean_pool,
    similarity,
    sinkhorn_distance,
    summed_layer_loss,
    wasserstein_contrastive_loss,
)

# Hand example: text [2, 0], [0, 3] normalise to e1, e2; speech [1, 0], [1, 1] to e1, (e1 + e2) / sqrt(2).
# With tau = 0.1, S = [[10, 10 / sqrt(2)], [0, 10 / sqrt(2)]] (r = 10 / sqrt(2) = 7.0711).
TEXT = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
SPEECH = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
R = 10 / math.sqrt(2)
# text -> speech, rows: l0 = -10 + log(e^10 + e^r) = 0.052074, l1 = -r + log(e^0 + e^r) = 0.000849.
HAND_TEXT_TO_SPEECH = ((-10 + math.log(math.exp(10) + math.exp(R))) + (-R + math.log(1 + math.exp(R)))) / 2
# speech -> text, columns of S: m0 = -10 + log(e^10 + e^0) = 0.0000454, m1 = -r + log(e^r + e^r) = log 2.
HAND_SPEECH_TO_TEXT = ((-10 + math.log(math.exp(10) + 1)) + math.log(2)) / 2
# Swapped pairs (text e1, e2 against speech e2, e1): each row is [0, 10] with the positive at 0: log(1 + e^10).
HAND_SWAPPED = math.log(1 + math.exp(10))


def test_hand_constants():
    assert HAND_TEXT_TO_SPEECH == pytest.approx(0.0264617, abs=1e-6)
    assert HAND_SPEECH_TO_TEXT == pytest.approx(0.3465963, abs=1e-6)
    assert HAND_SWAPPED == pytest.approx(10.0000454, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# mean pooling and InfoNCE


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [float("nan"), 1e9]], [[0.0, 1.0], [0.0, 2.0], [0.0, 6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(mean_pool(hidden, mask), TEXT)  # [1 + 3, 0] / 2 and [0, 1 + 2 + 6] / 3
    bf16 = mean_pool(hidden.bfloat16(), mask.bool())
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), TEXT)


def test_mean_pool_errors():
    with pytest.raises(ValueError, match=r"rows \[1\] have no valid position"):
        mean_pool(torch.ones(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="expects hidden"):
        mean_pool(torch.ones(2, 3, 4), torch.ones(2, 4))


def test_info_nce_one_direction_hand_value():
    out = info_nce(TEXT, SPEECH)
    assert out.loss.item() == pytest.approx(HAND_TEXT_TO_SPEECH, rel=1e-5)
    torch.testing.assert_close(out.logits, torch.tensor([[10.0, R], [0.0, R]]))
    assert out.targets.tolist() == [0, 1]
    torch.testing.assert_close(out.logits, similarity(TEXT, SPEECH, 0.1))


def test_info_nce_symmetric_hand_value():
    out = info_nce(TEXT, SPEECH, symmetric=True)
    assert out.loss.item() == pytest.approx((HAND_TEXT_TO_SPEECH + HAND_SPEECH_TO_TEXT) / 2, rel=1e-5)
    # The logged logits stay text -> speech.
    torch.testing.assert_close(out.logits, torch.tensor([[10.0, R], [0.0, R]]))


def test_info_nce_temperature_scales_logits():
    # tau = 1: row 0 is [1, 1 / sqrt(2)], row 1 [0, 1 / sqrt(2)].
    s = 1 / math.sqrt(2)
    hand = ((-1 + math.log(math.e + math.exp(s))) + (-s + math.log(1 + math.exp(s)))) / 2
    assert info_nce(TEXT, SPEECH, temperature=1.0).loss.item() == pytest.approx(hand, rel=1e-5)
    assert info_nce(TEXT, SPEECH, temperature=torch.tensor(1.0)).loss.item() == pytest.approx(hand, rel=1e-5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        info_nce(TEXT, SPEECH, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        info_nce(TEXT, SPEECH[:1])


def test_info_nce_on_mean_pooled_padded_sequences():
    text_hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [5.0, 5.0]], [[0.0, 1.0], [0.0, 2.0], [0.0, 6.0]]])
    text_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    speech_hidden = torch.tensor([[[1.0, 0.0], [-4.0, 2.0]], [[2.0, 0.0], [0.0, 2.0]]])
    speech_mask = torch.tensor([[1, 0], [1, 1]])
    loss = info_nce(mean_pool(text_hidden, text_mask), mean_pool(speech_hidden, speech_mask)).loss
    assert loss.item() == pytest.approx(HAND_TEXT_TO_SPEECH, rel=1e-5)
    # Changing what the padded positions hold changes nothing.
    text_hidden[0, 2] = torch.tensor([-100.0, 7.0])
    speech_hidden[0, 1] = torch.tensor([float("inf"), 0.0])
    again = info_nce(mean_pool(text_hidden, text_mask), mean_pool(speech_hidden, speech_mask)).loss
    assert again.item() == loss.item()


def test_summed_layer_loss_is_the_sum_of_the_hand_values():
    per_layer = {
        0: info_nce(TEXT, SPEECH).loss,
        5: info_nce(torch.eye(2), torch.eye(2).flip(0)).loss,
    }
    assert per_layer[5].item() == pytest.approx(HAND_SWAPPED, rel=1e-6)
    assert summed_layer_loss(per_layer).item() == pytest.approx(HAND_TEXT_TO_SPEECH + HAND_SWAPPED, rel=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        summed_layer_loss({})


# ----------------------------------------------------------------------------------------------------------------
# layer indices


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        (1, [0, 1]),
        (2, [0, 1, 2]),
        (16, [0, 3, 6, 9, 12, 16]),
        (22, [0, 3, 6, 9, 12, 15, 18, 22]),
        (32, [0, 5, 10, 15, 20, 25, 32]),
        (40, [0, 6, 12, 18, 24, 30, 40]),
        (80, [0, 13, 26, 39, 52, 65, 80]),
    ],
)
def test_all_layers(depth, expected):
    assert contrastive_layer_indices(depth) == expected
    assert contrastive_layer_indices(depth, "all") == expected


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(1, 256))
def test_all_layers_spacing_rule(depth):
    indices = contrastive_layer_indices(depth)
    step = max(1, math.floor(5 * depth / 32 + 0.5))
    assert indices[0] == 0 and indices[-1] == depth
    assert all(b - a == step for a, b in zip(indices[:-2], indices[1:-1]))  # evenly spaced ...
    assert step <= depth - indices[-2] < 2 * step  # ... and a full step below the last state


def test_single_and_explicit_layers():
    assert contrastive_layer_indices(32, 0) == [0]
    assert contrastive_layer_indices(32, 32) == [32]
    assert contrastive_layer_indices(32, -1) == [32]
    assert contrastive_layer_indices(32, -33) == [0]
    assert contrastive_layer_indices(32, [32, 0, 5, -1, 5]) == [0, 5, 32]
    assert contrastive_layer_indices(32, np.array([10, 0])) == [0, 10]
    assert contrastive_layer_indices(32, "0") == [0]
    assert contrastive_layer_indices(32, "0, 16,-1") == [0, 16, 32]


@pytest.mark.parametrize(
    ("depth", "spec", "message"),
    [
        (32, 33, r"valid hidden-state indices are 0\.\.32 \(or -33\.\.-1"),
        (32, -34, r"0\.\.32"),
        (32, [0, 40], r"layer index 40 is out of range for an LLM with 32 layers"),
        (32, [], "empty"),
        (32, "every", "'all', an index"),
        (32, [1.5], "must be ints"),
        (32, True, "must be ints"),
        (0, "all", "positive int"),
    ],
)
def test_layer_spec_errors(depth, spec, message):
    with pytest.raises(ValueError, match=message):
        contrastive_layer_indices(depth, spec)


# ----------------------------------------------------------------------------------------------------------------
# learnable temperature


def test_learnable_temperature_starts_at_0_1_and_gets_a_gradient():
    temperature = LearnableTemperature()
    assert temperature().item() == pytest.approx(0.1, rel=1e-6)
    assert temperature.log_inv_temperature.item() == pytest.approx(math.log(10), rel=1e-6)
    loss = info_nce(TEXT, SPEECH, temperature=temperature()).loss
    assert loss.item() == pytest.approx(HAND_TEXT_TO_SPEECH, rel=1e-5)
    loss.backward()
    grad = temperature.log_inv_temperature.grad
    assert grad is not None and grad.item() < 0  # sharper logits lower this loss: tau should shrink


def test_learnable_temperature_is_clamped():
    temperature = LearnableTemperature()
    with torch.no_grad():
        temperature.log_inv_temperature.fill_(math.log(1e4))
    assert temperature().item() == pytest.approx(0.01, rel=1e-6)
    with torch.no_grad():
        temperature.log_inv_temperature.fill_(-3.0)
    assert temperature().item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="min_value <= init <= max_value"):
        LearnableTemperature(init=2.0)


# ----------------------------------------------------------------------------------------------------------------
# gathered negatives


def test_gather_is_a_no_op_without_distributed():
    tensor = torch.randn(3, 4)
    assert gather_with_grad(tensor) is tensor
    assert gather_batch_sizes(3) == [3]
    out = info_nce(TEXT, SPEECH, gather_negatives=True)
    assert out.loss.item() == pytest.approx(HAND_TEXT_TO_SPEECH, rel=1e-5)


def test_global_targets():
    assert global_targets([3, 2], 0).tolist() == [0, 1, 2]
    assert global_targets([3, 2], 1).tolist() == [3, 4]
    assert global_targets([4, 4, 4], 2).tolist() == [8, 9, 10, 11]


def _doubled_batch_problem(batch_sizes, seed=0):
    """A trainable projector (replicated on every process) and frozen text, the global batch split by rank."""
    torch.manual_seed(seed)
    projector = nn.Linear(4, 3)
    speech_in = torch.randn(sum(batch_sizes), 4)
    text = torch.randn(sum(batch_sizes), 3)
    rows = [slice(sum(batch_sizes[:r]), sum(batch_sizes[: r + 1])) for r in range(len(batch_sizes))]
    return projector, speech_in, text, rows


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("batch_sizes", [(3, 3), (3, 2)])
def test_gathered_negatives_two_rank_simulation_matches_doubled_batch(monkeypatch, batch_sizes, symmetric):
    projector, speech_in, text, rows = _doubled_batch_problem(batch_sizes)
    params = list(projector.parameters())
    reference = info_nce(text, projector(speech_in), symmetric=symmetric)
    reference_grads = torch.autograd.grad(reference.loss, params)

    speech = [projector(speech_in[r]) for r in rows]  # each rank's local forward
    texts = [text[r] for r in rows]
    received = [torch.zeros_like(s) for s in speech]  # gradient each rank's shard gets back from the gather
    local_only = [torch.zeros_like(s) for s in speech]  # what a gather without a backward would leave
    losses = []
    for rank in range(2):
        copies = []

        def fake_gather(tensor, sizes, rank=rank, copies=copies):
            # What the other rank's all_gather delivers: copies of its rows; the gradient they get is sent back.
            source = speech if tensor is speech[rank] else texts
            parts = []
            for owner in range(2):
                if owner == rank:
                    parts.append(tensor)
                else:
                    copy = source[owner].detach().requires_grad_(source[owner].requires_grad)
                    copies += [(owner, copy)] if copy.requires_grad else []
                    parts.append(copy)
            return torch.cat(parts)

        monkeypatch.setattr(cl, "_rank_and_world_size", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(cl, "gather_batch_sizes", lambda size, device=None: list(batch_sizes))
        monkeypatch.setattr(cl, "gather_with_grad", fake_gather)
        out = cl.info_nce(texts[rank], speech[rank], symmetric=symmetric, gather_negatives=True)
        assert out.logits.shape == (batch_sizes[rank], sum(batch_sizes))
        assert out.targets.tolist() == list(range(sum(batch_sizes)))[rows[rank]]
        losses.append(out.loss.item())
        grads = torch.autograd.grad(out.loss, [speech[rank]] + [copy for _, copy in copies])
        received[rank] += grads[0]
        local_only[rank] += grads[0]
        for (owner, _), grad in zip(copies, grads[1:]):
            received[owner] += grad

    def ddp_average(shard_grads):
        # Each rank back-propagates its shard's gradient through its replica; DDP averages over ranks.
        per_rank = [torch.autograd.grad(s, params, g, retain_graph=True) for s, g in zip(speech, shard_grads)]
        return [(a + b) / 2 for a, b in zip(*per_rank)]

    assert sum(losses) / 2 == pytest.approx(reference.loss.item(), rel=1e-6)
    for got, want in zip(ddp_average(received), reference_grads):
        torch.testing.assert_close(got, want)
    # Control: dropping the gradient of the rows used as negatives elsewhere gives a different gradient.
    assert not all(torch.allclose(g, w) for g, w in zip(ddp_average(local_only), reference_grads))


def _ddp_losses_and_grads(rank, batch_sizes):
    results = {}
    for symmetric in (False, True):
        projector, speech_in, text, rows = _doubled_batch_problem(batch_sizes)
        model = nn.parallel.DistributedDataParallel(projector)
        out = info_nce(text[rows[rank]], model(speech_in[rows[rank]]), symmetric=symmetric, gather_negatives=True)
        out.loss.backward()
        results[symmetric] = {
            "loss": out.loss.detach(),
            "logits": out.logits.detach(),
            "targets": out.targets,
            "grads": [p.grad for p in projector.parameters()],
        }
    return results


def _ddp_worker(rank, world_size, init_file, out_dir, batch_sizes):
    torch.set_num_threads(1)  # a forked child should not touch the parent's thread pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(_ddp_losses_and_grads(rank, batch_sizes), f"{out_dir}/{rank}.pt")
    finally:
        gc.collect()  # a DDP wrapper still alive when its process group is destroyed can hang the exit
        dist.destroy_process_group()


def test_gathered_negatives_under_ddp_gloo_match_doubled_batch(tmp_path):
    # Two real processes (gloo, as under `accelerate launch --cpu --num_processes 2`), unequal local batches.
    batch_sizes = (3, 2)
    args = (2, tmp_path / "init", tmp_path, batch_sizes)
    mp.start_processes(_ddp_worker, args=args, nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for symmetric in (False, True):
        projector, speech_in, text, rows = _doubled_batch_problem(batch_sizes)
        reference = info_nce(text, projector(speech_in), symmetric=symmetric)
        reference.loss.backward()
        per_rank = [result[symmetric] for result in results]
        mean_loss = (per_rank[0]["loss"] + per_rank[1]["loss"]).item() / 2
        assert mean_loss == pytest.approx(reference.loss.item(), rel=1e-6)
        for rank, result in enumerate(per_rank):
            torch.testing.assert_close(result["logits"], reference.logits[rows[rank]])
            assert result["targets"].tolist() == list(range(5))[rows[rank]]
            for got, param in zip(result["grads"], projector.parameters()):
                torch.testing.assert_close(got, param.grad)


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn divergence


def _reference_sinkhorn(x, y, p=2, blur=0.05, scaling=0.5):
    """geomloss's SamplesLoss("sinkhorn") algorithm for ONE pair of point clouds (N, D), (M, D), written plainly."""

    def cost(u, v):
        squared = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)  # (N, M)
        return squared / 2 if p == 2 else squared.clamp_min(1e-8).sqrt()

    def softmin(eps, c, h):
        return -eps * torch.logsumexp(h[None, :] - c / eps, dim=1)

    points = torch.cat([x, y]).detach()
    diameter = (points.max(0).values - points.min(0).values).norm().item()
    eps_list = (
        [diameter**p]
        + [math.exp(e) for e in np.arange(p * math.log(diameter), p * math.log(blur), p * math.log(scaling))]
        + [blur**p]
    )
    a_log = torch.full((len(x),), -math.log(len(x)), dtype=x.dtype)
    b_log = torch.full((len(y),), -math.log(len(y)), dtype=y.dtype)
    with torch.no_grad():
        c_xy, c_xx, c_yy = cost(x, y), cost(x, x), cost(y, y)
        eps = eps_list[0]
        f_ba, g_ab = softmin(eps, c_xy, b_log), softmin(eps, c_xy.T, a_log)
        f_aa, g_bb = softmin(eps, c_xx, a_log), softmin(eps, c_yy, b_log)
        for eps in eps_list:
            f_ba, g_ab, f_aa, g_bb = (
                (f_ba + softmin(eps, c_xy, b_log + g_ab / eps)) / 2,
                (g_ab + softmin(eps, c_xy.T, a_log + f_ba / eps)) / 2,
                (f_aa + softmin(eps, c_xx, a_log + f_aa / eps)) / 2,
                (g_bb + softmin(eps, c_yy, b_log + g_bb / eps)) / 2,
            )
    f_ba, g_ab, f_aa, g_bb = (
        softmin(eps, cost(x, y.detach()), b_log + g_ab / eps),
        softmin(eps, cost(y, x.detach()), a_log + f_ba / eps),
        softmin(eps, cost(x, x.detach()), a_log + f_aa / eps),
        softmin(eps, cost(y, y.detach()), b_log + g_bb / eps),
    )
    return (f_ba - f_aa).mean() + (g_ab - g_bb).mean()


def _reference_distances(x, x_mask, y, y_mask, **kwargs):
    """The original's Python loop over the B x B pairs, each on the unpadded sequences."""
    rows = []
    for xi, mi in zip(x, x_mask.bool()):
        rows.append(torch.stack([_reference_sinkhorn(xi[mi], yj[mj], **kwargs) for yj, mj in zip(y, y_mask.bool())]))
    return torch.stack(rows)


def _random_sequences(batch, max_len, dim, generator, scale=1.0):
    lengths = torch.randint(1, max_len + 1, (batch,), generator=generator)
    lengths[0] = max_len
    mask = torch.arange(max_len)[None] < lengths[:, None]  # (B, L)
    return torch.randn(batch, max_len, dim, generator=generator) * scale, mask


def test_sinkhorn_single_points_give_half_squared_distance():
    a = torch.tensor([[[1.0, 2.0, 0.0]]])  # (1, 1, 3)
    b = torch.tensor([[[4.0, 6.0, 0.0]]])
    one = torch.ones(1, 1, dtype=torch.bool)
    # ||a - b||^2 = 9 + 16 = 25: cost ||a - b||^p / p, the only plan is the product, no entropic bias.
    assert sinkhorn_distance(a, one, b, one).item() == pytest.approx(25 / 2, rel=1e-6)
    # p = 1: ||a - b|| = 5, less sqrt(1e-8) = 1e-4 from the clamp geomloss puts on the zero self-distance.
    assert sinkhorn_distance(a, one, b, one, p=1).item() == pytest.approx(5.0 - 1e-4, abs=1e-5)
    # Same with padding around the points.
    padded_a = torch.cat([a, torch.full((1, 2, 3), 7.0)], dim=1)
    mask = torch.tensor([[True, False, False]])
    assert sinkhorn_distance(padded_a, mask, b, one).item() == pytest.approx(12.5, rel=1e-6)


def test_sinkhorn_self_distance_is_zero_and_smallest_for_separated_sequences():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    x, x_mask = _random_sequences(4, 6, 3, generator, scale=0.3)
    y, y_mask = _random_sequences(4, 5, 3, generator, scale=0.3)
    x, y = x + centres[:, None], y + centres[:, None]
    self_distances = sinkhorn_distance(x, x_mask, x, x_mask)  # (4, 4)
    assert self_distances.diagonal().abs().max().item() < 1e-4
    off_diagonal = self_distances + torch.eye(4) * 1e9
    assert (off_diagonal.min(dim=1).values > 1.0).all()
    cross = sinkhorn_distance(x, x_mask, y, y_mask)  # same centres on the diagonal
    assert (cross.argmin(dim=1) == torch.arange(4)).all()
    assert (cross.argmin(dim=0) == torch.arange(4)).all()


def test_sinkhorn_matches_per_pair_loop_values_and_gradients():
    # float64, so that the comparison tests the algorithm: in float32 the costs' rounding (expanded vs direct
    # squared distances), divided by epsilon = 0.0025, moves the gradients by about 1e-4.
    generator = torch.Generator().manual_seed(1)
    x, x_mask = _random_sequences(3, 7, 5, generator)
    y, y_mask = _random_sequences(4, 4, 5, generator)
    x = x.double().requires_grad_(True)
    y = y.double().requires_grad_(True)
    weights = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    distances = sinkhorn_distance(x, x_mask, y, y_mask)
    assert distances.dtype == torch.float64
    reference = _reference_distances(x, x_mask, y, y_mask)
    torch.testing.assert_close(distances, reference, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((distances * weights).sum(), (x, y))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (x, y))
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert grads[0][~x_mask].abs().max() == 0 and grads[1][~y_mask].abs().max() == 0


def test_sinkhorn_explicit_diameter_and_scaling_match_loop():
    generator = torch.Generator().manual_seed(2)
    x, x_mask = _random_sequences(2, 5, 4, generator)
    y, y_mask = _random_sequences(2, 6, 4, generator)
    distances = sinkhorn_distance(x, x_mask, y, y_mask, blur=0.1, scaling=0.8)
    reference = _reference_distances(x, x_mask, y, y_mask, blur=0.1, scaling=0.8)
    torch.testing.assert_close(distances, reference, rtol=1e-5, atol=1e-5)
    # A larger shared starting scale only adds annealing steps: the result moves little.
    wide = sinkhorn_distance(x, x_mask, y, y_mask, blur=0.1, scaling=0.8, diameter=100.0)
    torch.testing.assert_close(wide, distances, rtol=1e-2, atol=1e-2)


def test_sinkhorn_padding_invariance():
    generator = torch.Generator().manual_seed(3)
    x, x_mask = _random_sequences(3, 5, 4, generator)
    y, y_mask = _random_sequences(3, 6, 4, generator)
    distances = sinkhorn_distance(x, x_mask, y, y_mask)
    garbage_x = torch.cat([x, torch.randn(3, 4, 4, generator=generator) * 1e3], dim=1)
    garbage_x[0, -1] = float("nan")
    garbage_y = torch.cat([y, torch.full((3, 2, 4), float("inf"))], dim=1)
    mask_x = torch.cat([x_mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    mask_y = torch.cat([y_mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(sinkhorn_distance(garbage_x, mask_x, garbage_y, mask_y), distances)


def test_sinkhorn_vectorised_equals_the_loop_on_a_training_sized_batch():
    # The batch of benchmarks/contrastive_step.py, which times the two.
    generator = torch.Generator().manual_seed(4)
    x, x_mask = _random_sequences(16, 24, 32, generator, scale=0.2)
    y, y_mask = _random_sequences(16, 12, 32, generator, scale=0.2)
    torch.testing.assert_close(
        sinkhorn_distance(x, x_mask, y, y_mask), _reference_distances(x, x_mask, y, y_mask), rtol=1e-5, atol=1e-5
    )


def test_sinkhorn_matches_geomloss_when_installed():
    geomloss = pytest.importorskip("geomloss")
    generator = torch.Generator().manual_seed(5)
    x, x_mask = _random_sequences(3, 6, 8, generator)
    y, y_mask = _random_sequences(2, 5, 8, generator)
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, backend="tensorized")
    expected = torch.stack(
        [torch.stack([loss(xi[mi], yj[mj]) for yj, mj in zip(y, y_mask)]) for xi, mi in zip(x, x_mask)]
    )
    torch.testing.assert_close(sinkhorn_distance(x, x_mask, y, y_mask), expected, rtol=1e-5, atol=1e-5)


def test_sinkhorn_errors():
    ok = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"rows \[1\] of y have no valid position"):
        sinkhorn_distance(torch.randn(2, 3, 4), ok, torch.randn(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        sinkhorn_distance(torch.randn(2, 3, 4), ok, torch.randn(2, 3, 4), ok, p=3)
    with pytest.raises(ValueError, match="same feature size"):
        sinkhorn_distance(torch.randn(2, 3, 4), ok, torch.randn(2, 3, 5), ok)


def test_wasserstein_contrastive_hand_value():
    # Single-point sequences (plus padding), normalised to unit length first: t0 = (1, 0), t1 = (0, 1);
    # s0 = (0.6, 0.8), s1 = (-1, 0). The divergence of two points is ||t - s||^2 / 2 = 1 - cos(t, s):
    # d = [[0.4, 2.0], [0.2, 1.0]], logits = -d / 0.1 = [[-4, -20], [-2, -10]];
    # l0 = 4 + log(e^-4 + e^-20) = log(1 + e^-16), l1 = 10 + log(e^-2 + e^-10) = 8 + log(1 + e^-8).
    hand = (math.log(1 + math.exp(-16)) + 8 + math.log(1 + math.exp(-8))) / 2
    text = torch.tensor([[[3.0, 0.0], [9.0, 9.0]], [[0.0, 0.5], [-9.0, 3.0]]])
    text_mask = torch.tensor([[1, 0], [1, 0]])
    speech = torch.tensor([[[6.0, 8.0], [4.0, 4.0], [4.0, 4.0]], [[-2.0, 0.0], [2.0, 2.0], [2.0, 2.0]]])
    speech_mask = torch.tensor([[1, 0, 0], [1, 0, 0]])
    out = wasserstein_contrastive_loss(text, text_mask, speech, speech_mask)
    torch.testing.assert_close(out.logits, torch.tensor([[-4.0, -20.0], [-2.0, -10.0]]))
    assert out.loss.item() == pytest.approx(hand, rel=1e-5)
    assert out.targets.tolist() == [0, 1]


def _unit(seq):
    return seq / seq.norm(dim=-1, keepdim=True)


def test_wasserstein_contrastive_matches_loop_cross_entropy():
    generator = torch.Generator().manual_seed(6)
    text, text_mask = _random_sequences(3, 4, 6, generator)
    speech, speech_mask = _random_sequences(3, 7, 6, generator)
    out = wasserstein_contrastive_loss(text, text_mask, speech, speech_mask, temperature=0.5)
    logits = -_reference_distances(_unit(text), text_mask, _unit(speech), speech_mask) / 0.5
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.arange(3)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch sizes differ"):
        wasserstein_contrastive_loss(text, text_mask, speech[:2], speech_mask[:2])


def test_wasserstein_loss_is_the_originals_with_every_token_normalised_in_float32():
    """The original, written out on a fixed bf16 batch: per pair, the unpadded sequences cast to float32,
    L2-normalised token by token, geomloss's SamplesLoss("sinkhorn", p=2, blur=0.05); logits -distance / 0.1;
    cross-entropy text -> speech. Norms of a few hundred (as the LLM's hidden states have) and differing between the
    sides: without the normalisation the logits would be thousands apart."""
    geomloss = pytest.importorskip("geomloss")
    generator = torch.Generator().manual_seed(7)
    text, text_mask = _random_sequences(4, 6, 16, generator, scale=100.0)
    speech, speech_mask = _random_sequences(4, 9, 16, generator, scale=3.0)
    text, speech = text.bfloat16(), speech.bfloat16()
    text_leaf = text.float().requires_grad_(True)
    speech_leaf = speech.float().requires_grad_(True)
    sinkhorn = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, backend="tensorized")
    distances = torch.stack(
        [
            torch.stack(
                [
                    sinkhorn(F.normalize(t[tm], p=2, dim=-1), F.normalize(s[sm], p=2, dim=-1))
                    for s, sm in zip(speech_leaf, speech_mask)
                ]
            )
            for t, tm in zip(text_leaf, text_mask)
        ]
    )
    reference = F.cross_entropy(-distances / 0.1, torch.arange(4))
    reference_grads = torch.autograd.grad(reference, (text_leaf, speech_leaf))

    text_in, speech_in = text.requires_grad_(True), speech.requires_grad_(True)
    out = wasserstein_contrastive_loss(text_in, text_mask, speech_in, speech_mask)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, -distances.detach() / 0.1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.loss, (text_in, speech_in))
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=1e-2, atol=1e-3)
    # Only directions count: rescaling every token leaves the loss as it was.
    scales = torch.rand(4, 6, 1, generator=generator) * 10 + 0.1
    rescaled = wasserstein_contrastive_loss(text.detach().float() * scales, text_mask, speech.detach(), speech_mask)
    torch.testing.assert_close(rescaled.loss, out.loss.detach(), rtol=1e-5, atol=1e-5)


def test_wasserstein_loss_ignores_non_finite_padding_in_value_and_gradient():
    generator = torch.Generator().manual_seed(8)
    text, text_mask = _random_sequences(3, 5, 4, generator)
    speech, speech_mask = _random_sequences(3, 6, 4, generator)
    expected = wasserstein_contrastive_loss(text, text_mask, speech, speech_mask).loss
    garbage = torch.cat([text, torch.full((3, 2, 4), float("nan"))], dim=1).requires_grad_(True)
    garbage_mask = torch.cat([text_mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    loss = wasserstein_contrastive_loss(garbage, garbage_mask, speech, speech_mask).loss
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, garbage)
    assert torch.isfinite(grad).all() and grad[~garbage_mask].abs().max() == 0
