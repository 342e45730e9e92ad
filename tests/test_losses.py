"""Checks the distillation losses against explicit float64 formulas."""

import pytest
import torch
import torch.nn.functional as F

from kd_sweeps.losses import LOSS_NAMES, ce_loss, kd_loss, masked_mean, token_divergence, total_loss
from tests.helpers import kl, ref_divergence_from_probs

B, T, V = 3, 5, 11
# Non-default values as well, so a parameter that is silently ignored shows up.
PARAMS = [dict(beta=0.5, alpha=0.1, mix=0.5), dict(beta=0.3, alpha=0.25, mix=0.8)]


# ---------------------------------------------------------------- reference
def _probs(logits):
    z = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return z / z.sum(dim=-1, keepdim=True)


def ref_divergence(s_logits, t_logits, name, beta=0.5, alpha=0.1, mix=0.5):
    """Per-position divergence (...,) from explicit formulas."""
    return ref_divergence_from_probs(_probs(s_logits), _probs(t_logits), name, beta, alpha, mix)


def ref_kd(s_logits, t_logits, mask, name, temperature=1.0, **params):
    div = ref_divergence(s_logits / temperature, t_logits / temperature, name, **params)
    m = mask.to(div.dtype)
    return (div * m).sum() / m.sum() * temperature**2


# ---------------------------------------------------------------- fixtures
def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    t = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 0], mask[-1, -1] = True, False  # at least one in, one out
    return s, t, mask


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_value_and_grad_match_reference(name, params):
    s, t, mask = _batch()
    got = kd_loss(s, t, mask, name, **params)
    want = ref_kd(s, t, mask, name, **params)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(_grad(got, s), _grad(want, s), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_token_divergence_per_position(name):
    s, t, _ = _batch(seed=1)
    got = token_divergence(s.reshape(-1, V), t.reshape(-1, V), name)
    assert got.shape == (B * T,)
    torch.testing.assert_close(got, ref_divergence(s, t, name).reshape(-1), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_temperature_scaling(name):
    s, t, mask = _batch(seed=2)
    got = kd_loss(s, t, mask, name, temperature=2.0)
    want = ref_kd(s / 2, t / 2, mask, name) * 4
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(_grad(got, s), _grad(want, s), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_masked_is_exact_zero(name):
    s, t, mask = _batch(seed=3)
    empty = torch.zeros_like(mask)
    loss = kd_loss(s, t, empty, name, temperature=2.0)
    assert loss.item() == 0.0
    g = _grad(loss, s)
    assert not torch.isnan(g).any()
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_identical_distributions_give_zero(name, dtype):
    s, _, mask = _batch(seed=4, dtype=dtype)
    div = token_divergence(s.detach().reshape(-1, V), s.detach().reshape(-1, V), name, beta=0.3, alpha=0.2, mix=0.7)
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(div, torch.zeros_like(div), rtol=0, atol=atol)
    assert kd_loss(s, s.detach(), mask, name).abs().item() <= atol


@pytest.mark.parametrize("beta, other", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints(beta, other):
    s, t, mask = _batch(seed=5)
    got = kd_loss(s, t, mask, "jsd", beta=beta)
    want = kd_loss(s, t, mask, other)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(_grad(got, s), _grad(want, s), rtol=1e-12, atol=0)
    # Interior values are a genuine mixture, not either endpoint.
    mid = kd_loss(s, t, mask, "jsd", beta=0.5)
    assert 0 < mid.item() < min(got.item(), want.item())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_masked_positions_have_no_influence(name):
    s, t, mask = _batch(seed=6)
    base = kd_loss(s, t, mask, name)

    g = torch.Generator().manual_seed(7)
    noise = 50 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    s2 = torch.where(mask[..., None], s.detach(), noise).requires_grad_(True)
    t2 = torch.where(mask[..., None], t, -noise)
    # Garbage that would poison a multiply-by-zero mask.
    out = (~mask).nonzero()[0]
    s2.data[out[0], out[1]] = float("nan")
    t2[out[0], out[1], 0] = float("inf")

    changed = kd_loss(s2, t2, mask, name)
    torch.testing.assert_close(changed, base, rtol=1e-12, atol=0)
    grad = _grad(changed, s2)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    torch.testing.assert_close(grad[mask], _grad(base, s)[mask], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_chunked_rows_match_batched(name):
    s, t, mask = _batch(seed=8)
    batched = kd_loss(s, t, mask, name, temperature=1.5)

    rows_s, rows_t = s[mask], t[mask]  # (N, V)
    n = rows_s.shape[0]
    flat = kd_loss(rows_s, rows_t, torch.ones(n, dtype=torch.bool), name, temperature=1.5)
    torch.testing.assert_close(flat, batched, rtol=1e-12, atol=0)

    # Summing per-row divergences chunk by chunk gives the same mean.
    chunks = [token_divergence(a, b, name, temperature=1.5).sum()
              for a, b in zip(rows_s.split(3), rows_t.split(3))]
    torch.testing.assert_close(sum(chunks) / n * 1.5**2, batched, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"])
def test_zero_teacher_probabilities_are_finite(name):
    s, t, mask = _batch(seed=9)
    t = t.clone()
    t[..., :4] = float("-inf")  # teacher puts no mass on the first 4 tokens
    loss = kd_loss(s, t, mask, name)
    grad = _grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()

    # Reference on the same distributions with 0 log 0 = 0 written out explicitly.
    ps, pt = _probs(s), _probs(t)
    if name == "forward_kl":
        div = (torch.xlogy(pt, pt) - pt * torch.log(ps)).sum(-1)
    elif name == "tvd":
        div = 0.5 * (ps - pt).abs().sum(-1)
    elif name == "jsd":
        m = 0.5 * ps + 0.5 * pt
        div = 0.5 * kl(ps, m) + 0.5 * (torch.xlogy(pt, pt) - pt * torch.log(m)).sum(-1)
    elif name == "skew_kl":
        m = 0.9 * ps + 0.1 * pt
        div = (torch.xlogy(pt, pt) - pt * torch.log(m)).sum(-1)
    else:
        div = kl(ps, 0.9 * pt + 0.1 * ps)
    m = mask.double()
    want = (div * m).sum() / m.sum()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grad, _grad(want, s), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_shared_dead_vocab_columns(name):
    # Padded vocabulary entries are -inf for both models: the loss must equal
    # the loss on the live columns alone, with zero (not NaN) gradient on the
    # dead ones. Student gradients flow through 0 * log 0 here, which is where
    # an unguarded formula produces NaN.
    s, t, mask = _batch(seed=14)
    dead = float("-inf") * torch.ones(B, T, 3, dtype=torch.float64)
    s_pad = torch.cat([s.detach(), dead], dim=-1).requires_grad_(True)
    t_pad = torch.cat([t, dead], dim=-1)
    got = kd_loss(s_pad, t_pad, mask, name, temperature=2.0, **PARAMS[1])
    want = kd_loss(s, t, mask, name, temperature=2.0, **PARAMS[1])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    grad = _grad(got, s_pad)
    assert not torch.isnan(grad).any()
    assert torch.equal(grad[..., V:], torch.zeros_like(grad[..., V:]))
    torch.testing.assert_close(grad[..., :V], _grad(want, s), rtol=1e-12, atol=1e-15)


def test_reverse_kl_with_zero_teacher_mass_is_inf_not_nan():
    s, t, mask = _batch(seed=10)
    t = t.clone()
    t[..., 0] = float("-inf")
    assert kd_loss(s, t, mask, "reverse_kl").item() == float("inf")
    # With the reverse half weighted 0, combined_kl stays finite.
    assert torch.isfinite(kd_loss(s, t, mask, "combined_kl", mix=1.0))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_precision_is_upcast(name):
    s, t, mask = _batch(seed=11)
    got = kd_loss(s.detach().bfloat16(), t.bfloat16(), mask, name)
    assert got.dtype == torch.float32
    want = ref_kd(s.detach().bfloat16().double(), t.bfloat16().double(), mask, name)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_ce_loss_matches_cross_entropy():
    s, _, mask = _batch(seed=12)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(13))
    got = ce_loss(s, y, mask)
    want = F.cross_entropy(s[mask], y[mask])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(_grad(got, s), _grad(want, s), rtol=1e-12, atol=0)

    empty = ce_loss(s, y, torch.zeros_like(mask))
    assert empty.item() == 0.0
    assert torch.equal(_grad(empty, s), torch.zeros_like(s))


def test_masked_mean():
    v = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    mask = torch.tensor([True, False, True])
    out = masked_mean(v, mask)
    assert out.item() == 2.0
    assert torch.equal(_grad(out, v), torch.tensor([0.5, 0.0, 0.5]))

    none = masked_mean(v, torch.zeros_like(mask))
    assert none.item() == 0.0 and none.requires_grad
    assert torch.equal(_grad(none, v), torch.zeros(3))


def test_total_loss():
    ce, kd = torch.tensor(2.0), torch.tensor(6.0)
    assert total_loss(ce, kd, 0.25).item() == pytest.approx(3.0)
    assert total_loss(ce, kd, 0.0).item() == 2.0
    assert total_loss(ce, kd, 1.0).item() == 6.0
    with pytest.raises(ValueError):
        total_loss(ce, kd, 1.5)


def test_unknown_name_lists_allowed_names():
    s, t, mask = _batch()
    for call in (lambda: kd_loss(s, t, mask, "kl"), lambda: token_divergence(s[0], t[0], "kl")):
        with pytest.raises(ValueError) as info:
            call()
        for allowed in LOSS_NAMES:
            assert allowed in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(beta=1.5), dict(alpha=-0.1), dict(mix=2.0)])
def test_bad_parameters_raise(kwargs):
    s, t, mask = _batch()
    with pytest.raises(ValueError):
        kd_loss(s, t, mask, "jsd", **kwargs)
