"""The chunked KD + CE loss against the plain full-logits path (``losses.kd_loss`` + ``ce_loss``)."""

import pytest
import torch
import torch.nn.functional as F

from kd_sweeps.chunked_loss import chunked_kd_ce, final_hidden_and_head_weight, supervised_positions
from kd_sweeps.losses import LOSS_NAMES, ce_loss, kd_loss, total_loss
from tests.helpers import ref_divergence_from_probs

IGNORE = -100
B, T, H, HT, V = 3, 8, 6, 5, 17
# Non-default divergence parameters, so one that is silently dropped shows up.
PARAMS = dict(beta=0.3, alpha=0.25, mix=0.8)
KD_RATIO = 0.6
LAYOUTS = ("random", "left_pad", "right_pad")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: extra threads only add synchronisation, which on shared cores costs
    # several times the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _labels(layout: str, g: torch.Generator) -> torch.Tensor:
    """(B, T) unshifted labels with IGNORE where a position is not supervised."""
    labels = torch.randint(0, V, (B, T), generator=g)
    if layout == "random":
        labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE
    elif layout == "left_pad":  # pads, then an unsupervised prompt token, then the answer
        for row, pad in enumerate((0, 2, 5)):
            labels[row, :pad + 1] = IGNORE
    elif layout == "right_pad":  # an unsupervised prompt token, the answer, then pads
        for row, pad in enumerate((0, 3, 6)):
            labels[row, 0] = IGNORE
            labels[row, T - pad:] = IGNORE
    elif layout == "all_masked":
        labels[:] = IGNORE
    return labels


def _case(layout: str, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    hidden = torch.randn(B, T, H, generator=g, **f64).requires_grad_(True)
    weight = torch.randn(V, H, generator=g, **f64).requires_grad_(True)
    head_bias = torch.randn(V, generator=g, **f64).requires_grad_(True) if bias else None
    teacher_hidden = torch.randn(B, T, HT, generator=g, **f64)
    teacher_weight = 1.5 * torch.randn(V, HT, generator=g, **f64)
    return hidden, weight, head_bias, teacher_hidden, teacher_weight, _labels(layout, g)


def _full_path(hidden, weight, head_bias, teacher_logits, labels, name, temperature, kd_ratio=KD_RATIO):
    """The plain reference: full (B, T, V) logits, shifted, masked by the labels."""
    logits = F.linear(hidden, weight, head_bias)[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    ce = ce_loss(logits, targets.clamp_min(0), mask)
    kd = kd_loss(logits, teacher_logits[:, :-1], mask, name, temperature, **PARAMS)
    return total_loss(ce, kd, kd_ratio), ce, kd


def _chunked_path(hidden, weight, head_bias, teacher_hidden, teacher_weight, labels, name, temperature,
                  chunk_size, **extra):
    rows, targets = supervised_positions(labels)
    teacher_rows = None if teacher_hidden is None else teacher_hidden.flatten(0, 1)[rows]
    return chunked_kd_ce(hidden.flatten(0, 1)[rows], teacher_rows, weight, teacher_weight, targets,
                         name=name, kd_ratio=extra.pop("kd_ratio", KD_RATIO), temperature=temperature,
                         chunk_size=chunk_size, student_head_bias=head_bias, **PARAMS, **extra)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, [x for x in inputs if x is not None])


def _assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------- positions
def test_supervised_positions_by_hand():
    labels = torch.tensor([[5, IGNORE, 7, 8],
                           [IGNORE, IGNORE, IGNORE, 3]])
    rows, targets = supervised_positions(labels)
    # Position t is kept when labels[t + 1] is supervised; rows index the flattened (B * T).
    assert rows.tolist() == [1, 2, 4 + 2]
    assert targets.tolist() == [7, 8, 3]
    assert supervised_positions(torch.full((2, 3), IGNORE))[0].numel() == 0


# ---------------------------------------------------------------- dense teacher
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_matches_full_logits_path(name, temperature, layout):
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case(layout)
    want = _full_path(hidden, weight, None, teacher_hidden @ teacher_weight.T, labels, name, temperature)
    want_grads = _grads(want[0], [hidden, weight])
    n = int((labels[:, 1:] != IGNORE).sum())
    for chunk_size in (1, 3, n, n + 5):
        total, ce, kd, count = _chunked_path(hidden, weight, None, teacher_hidden, teacher_weight, labels,
                                             name, temperature, chunk_size)
        assert count == n and total.dtype == torch.float64
        for got_value, want_value in zip((total, ce, kd), want):
            _assert_close(got_value, want_value)
        for got_grad, want_grad in zip(_grads(total, [hidden, weight]), want_grads):
            _assert_close(got_grad, want_grad)


def test_head_bias_and_teacher_logits_fn():
    hidden, weight, head_bias, teacher_hidden, teacher_weight, labels = _case("random", seed=1, bias=True)

    def soft_capped(h):  # a teacher head that is not a plain linear map
        return 3.0 * torch.tanh(h @ teacher_weight.T / 3.0)

    want = _full_path(hidden, weight, head_bias, soft_capped(teacher_hidden), labels, "jsd", 2.0)
    got = _chunked_path(hidden, weight, head_bias, teacher_hidden, None, labels, "jsd", 2.0, 4,
                        teacher_logits_fn=soft_capped)
    _assert_close(got[0], want[0])
    for got_grad, want_grad in zip(_grads(got[0], [hidden, weight, head_bias]),
                                   _grads(want[0], [hidden, weight, head_bias])):
        _assert_close(got_grad, want_grad)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_kl_written_by_hand_handles_teacher_zeros_and_keeps_its_inputs(temperature):
    """forward_kl's hand-written gradient (forward_kl.dense_forward_kl): a teacher that gives some ids exactly 0
    probability (-inf logits) contributes 0 log 0 = 0 there, never NaN, as token_divergence does."""
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("right_pad", seed=4)
    banned = torch.tensor([0, 5, 11])

    def masked_teacher(h):  # (c, Ht) -> (c, V) with three ids impossible
        return (h @ teacher_weight.T).index_fill(-1, banned, float("-inf"))

    want = _full_path(hidden, weight, None, masked_teacher(teacher_hidden), labels, "forward_kl", temperature)
    rows = supervised_positions(labels)[0]
    kept = hidden.detach().flatten(0, 1)[rows].clone()
    got = _chunked_path(hidden, weight, None, teacher_hidden, None, labels, "forward_kl", temperature, 4,
                        teacher_logits_fn=masked_teacher)
    for got_value, want_value in zip(got[:3], want):
        assert torch.isfinite(got_value)
        _assert_close(got_value, want_value)
    for got_grad, want_grad in zip(_grads(got[0], [hidden, weight]), _grads(want[0], [hidden, weight])):
        assert torch.isfinite(got_grad).all()
        _assert_close(got_grad, want_grad)
    assert torch.equal(hidden.detach().flatten(0, 1)[rows], kept)  # the in-place steps touch only its own buffers


def test_weight_gradient_sum_of_a_bf16_product_into_fp32():
    """_add_product off CUDA (and its fallback there): the fp32 weight-gradient buffer plus a bf16
    product, against the same sum in fp64."""
    from kd_sweeps.chunked_loss import _add_product

    g = torch.Generator().manual_seed(3)
    acc = torch.randn(40, 24, generator=g)
    a, b = torch.randn(40, 16, generator=g).bfloat16(), torch.randn(16, 24, generator=g).bfloat16()
    want = acc.double() + a.double() @ b.double()
    _add_product(acc, a, b)
    torch.testing.assert_close(acc.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weight_gradient_sum_on_cuda_uses_one_fp32_output_gemm():
    from kd_sweeps import chunked_loss

    g = torch.Generator().manual_seed(3)
    acc = torch.randn(512, 256, generator=g).cuda()
    a = torch.randn(512, 128, generator=g).bfloat16().cuda()
    b = torch.randn(128, 256, generator=g).bfloat16().cuda()
    want = acc.double() + a.double() @ b.double()
    chunked_loss._add_product(acc, a, b)
    assert chunked_loss.FP32_OUT_MATMUL  # the GEMM exists in this torch (else it switched itself off)
    # fp32 accumulation of exact bf16 products: far tighter than a bf16-rounded product would be
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_masked_is_exact_zero(name, sparse):
    hidden, weight, head_bias, teacher_hidden, teacher_weight, labels = _case("all_masked", bias=True)
    extra = {}
    if sparse:
        extra["teacher_topk"] = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.long))
        teacher_hidden = None
    total, ce, kd, count = _chunked_path(hidden, weight, head_bias, teacher_hidden, teacher_weight, labels,
                                         name, 2.0, 3, **extra)
    assert count == 0 and total.item() == 0.0 and ce.item() == 0.0 and kd.item() == 0.0
    for grad in _grads(total, [hidden, weight, head_bias]):
        assert torch.equal(grad, torch.zeros_like(grad))  # also: no NaN


def test_unsupervised_rows_cannot_leak():
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("right_pad", seed=2)
    base = _chunked_path(hidden, weight, None, teacher_hidden, teacher_weight, labels, "forward_kl", 1.0, 3)
    keep = torch.zeros(B * T, dtype=torch.bool)
    keep[supervised_positions(labels)[0]] = True
    poisoned = torch.where(keep.view(B, T, 1), hidden.detach(), float("nan")).requires_grad_(True)
    got = _chunked_path(poisoned, weight, None, teacher_hidden.masked_fill(~keep.view(B, T, 1), float("inf")),
                        teacher_weight, labels, "forward_kl", 1.0, 3)
    assert torch.equal(got[0], base[0])
    grad = _grads(got[0], [poisoned])[0]
    assert torch.equal(grad[~keep.view(B, T)], torch.zeros_like(grad[~keep.view(B, T)]))


# ---------------------------------------------------------------- sparse (top-k) teacher
def _topk_teacher(teacher_logits, temperature, k):
    """Top-k of the teacher's log-probs at the loss temperature: (values (N, k), indices (N, k))."""
    return torch.log_softmax(teacher_logits / temperature, dim=-1).topk(k, dim=-1)


def _bucket_probs(student_logits, values, indices, temperature):
    """Plain reference: both distributions on the k ids plus one rest bucket, as probabilities."""
    ps = torch.softmax(student_logits / temperature, dim=-1).gather(1, indices)  # (N, k)
    pt = values.exp()
    return torch.cat([ps, 1 - ps.sum(1, keepdim=True)], 1), torch.cat([pt, 1 - pt.sum(1, keepdim=True)], 1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_sparse_matches_bucket_reference(name, temperature):
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("random", seed=3)
    rows, targets = supervised_positions(labels)
    student_hidden = hidden.flatten(0, 1)[rows]  # (N, H)
    values, indices = _topk_teacher(teacher_hidden.flatten(0, 1)[rows] @ teacher_weight.T, temperature, k=4)

    logits = student_hidden @ weight.T  # (N, V)
    ps, pt = _bucket_probs(logits, values, indices, temperature)
    kd_want = ref_divergence_from_probs(ps, pt, name, **PARAMS).mean() * temperature**2
    ce_want = F.cross_entropy(logits, targets)
    want = (1 - KD_RATIO) * ce_want + KD_RATIO * kd_want
    want_grads = _grads(want, [hidden, weight])
    for chunk_size in (1, 3, len(rows) + 5):
        total, ce, kd, _ = chunked_kd_ce(hidden.flatten(0, 1)[rows], None, weight, None, targets, name=name,
                                         kd_ratio=KD_RATIO, temperature=temperature, chunk_size=chunk_size,
                                         teacher_topk=(values, indices), **PARAMS)
        _assert_close(kd, kd_want)
        _assert_close(ce, ce_want)
        for got_grad, want_grad in zip(_grads(total, [hidden, weight]), want_grads):
            _assert_close(got_grad, want_grad)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_forward_kl_by_hand_stays_finite_for_a_confident_student(temperature):
    """A student so sure of one id that every id outside the teacher's top-k has probability below
    fp32's smallest number: the rest bucket is taken in the log domain, as autograd's logsumexp
    path takes it, so the loss and gradient stay finite and equal that path's."""
    from kd_sweeps.chunked_loss import _sparse_divergence
    from kd_sweeps.forward_kl import sparse_forward_kl

    g = torch.Generator().manual_seed(6)
    values, indices = _topk_teacher(torch.randn(5, V, generator=g, dtype=torch.float64), temperature, k=4)
    values = values.float()
    logits = torch.randn(5, V, generator=g)
    # The student's favourite is one of the teacher's top-k; every id outside them sits ~400 / tau
    # below it, so their probabilities underflow to 0 in fp32 (and their sum with them).
    logits.scatter_add_(1, indices[:, :1], torch.full((5, 1), 400.0))
    loss = dict(name="forward_kl", temperature=temperature, beta=0.5, alpha=0.1, mix=0.5)
    leaf = logits.clone().requires_grad_(True)
    want = _sparse_divergence(leaf, values, indices, loss) * temperature ** 2  # (c,)
    (want_grad,) = torch.autograd.grad(want.sum() * 0.3, leaf)
    sums = torch.zeros(2)
    got_grad = sparse_forward_kl(logits, values, indices, temperature, sums, 0.3)
    assert torch.isfinite(sums).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(sums[1], want.sum().detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_sparse_with_all_but_one_id_equals_dense(name):
    # With k = V - 1 the rest bucket is a single token: the bucketed distributions are the full ones.
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("left_pad", seed=4)
    dense = _chunked_path(hidden, weight, None, teacher_hidden, teacher_weight, labels, name, 2.0, 5)
    rows, _ = supervised_positions(labels)
    topk = _topk_teacher(teacher_hidden.flatten(0, 1)[rows] @ teacher_weight.T, 2.0, k=V - 1)
    sparse = _chunked_path(hidden, weight, None, None, None, labels, name, 2.0, 5, teacher_topk=topk)
    _assert_close(sparse[2], dense[2])
    for got_grad, want_grad in zip(_grads(sparse[0], [hidden, weight]), _grads(dense[0], [hidden, weight])):
        _assert_close(got_grad, want_grad)


# ---------------------------------------------------------------- calling conventions
def test_backward_scales_with_the_incoming_gradient_and_runs_once():
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("random", seed=5)
    total = _chunked_path(hidden, weight, None, teacher_hidden, teacher_weight, labels, "tvd", 1.0, 4)[0]
    want = _grads(0.37 * _chunked_path(hidden, weight, None, teacher_hidden, teacher_weight, labels, "tvd",
                                       1.0, 4)[0], [hidden, weight])
    (0.37 * total).backward(retain_graph=True)
    _assert_close(hidden.grad, want[0])
    _assert_close(weight.grad, want[1])
    with pytest.raises(RuntimeError, match="only once"):
        total.backward()


def test_no_grad_gives_the_same_values_without_a_graph():
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("random", seed=6)
    with_grad = _chunked_path(hidden, weight, None, teacher_hidden, teacher_weight, labels, "jsd", 2.0, 3)
    with torch.no_grad():
        without = _chunked_path(hidden, weight, None, teacher_hidden, teacher_weight, labels, "jsd", 2.0, 3)
    assert not without[0].requires_grad
    for a, b in zip(with_grad[:3], without[:3]):
        assert torch.equal(a.detach(), b)


def test_without_teacher_or_kd_weight_the_total_is_ce():
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("random", seed=7)
    ce_only = _full_path(hidden, weight, None, teacher_hidden @ teacher_weight.T, labels, "forward_kl", 1.0)[1]
    no_teacher = _chunked_path(hidden, weight, None, None, None, labels, "forward_kl", 1.0, 3)
    no_weight = _chunked_path(hidden, weight, None, teacher_hidden, teacher_weight, labels, "forward_kl", 1.0, 3,
                              kd_ratio=0.0)
    for total, ce, kd, _ in (no_teacher, no_weight):
        _assert_close(total, ce_only)
        _assert_close(ce, ce_only)
        assert kd.item() == 0.0


def test_float32_autocast_stays_close_to_the_full_path():
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("random", seed=8)
    hidden32 = hidden.detach().float().requires_grad_(True)
    weight32 = weight.detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _chunked_path(hidden32, weight32, None, teacher_hidden.float(), teacher_weight.float(), labels,
                            "forward_kl", 1.0, 3)
    assert got[0].dtype == torch.float32
    want = _full_path(hidden, weight, None, teacher_hidden @ teacher_weight.T, labels, "forward_kl", 1.0)
    torch.testing.assert_close(got[0].double(), want[0].detach(), rtol=3e-2, atol=0)
    grad = _grads(got[0], [weight32])[0]
    torch.testing.assert_close(grad.double(), _grads(want[0], [weight])[0], rtol=5e-2, atol=5e-3)


def test_invalid_arguments_are_all_reported():
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _case("random")
    rows, targets = supervised_positions(labels)
    with pytest.raises(ValueError) as err:
        chunked_kd_ce(hidden.flatten(0, 1)[rows], teacher_hidden.flatten(0, 1)[rows], weight, teacher_weight[:, :2],
                      targets, name="kl", kd_ratio=1.5, temperature=0.0, chunk_size=0)
    for key in ("name='kl'", "kd_ratio=1.5", "temperature=0.0", "chunk_size=0", "teacher_head_weight"):
        assert key in str(err.value)
    values, indices = torch.zeros(len(rows), V), torch.zeros(len(rows), V, dtype=torch.long)
    with pytest.raises(ValueError) as err:
        chunked_kd_ce(hidden.flatten(0, 1)[rows], None, weight, None, targets, name="jsd", kd_ratio=0.5,
                      teacher_topk=(values, indices), teacher_logits_fn=torch.tanh)
    for key in ("k=17", "teacher_logits_fn"):
        assert key in str(err.value)


# ---------------------------------------------------------------- a real model
def _tiny_qwen3(hidden_size: int, seed: int, tie: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=300, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=0)
    return Qwen3ForCausalLM(config).double()


@pytest.mark.parametrize("name", ["skew_kl", "forward_kl"])  # autograd; gradient written by hand
def test_tiny_qwen3_loss_and_parameter_grads_match_full_logits(name):
    student = _tiny_qwen3(64, seed=0, tie=True)
    teacher = _tiny_qwen3(96, seed=1, tie=False).eval()
    g = torch.Generator().manual_seed(9)
    input_ids = torch.randint(1, 300, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding in row 0, right padding in row 1
    attention_mask[1, -4:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, :5] = IGNORE  # the prompt is not supervised either
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)

    logits = student(**batch).logits
    with torch.no_grad():
        teacher_logits = teacher(**batch).logits
    want = _full_path_logits(logits, teacher_logits, labels, name)
    params = [p for p in student.parameters()]
    want_grads = torch.autograd.grad(want, params)

    hidden, head = final_hidden_and_head_weight(student, **batch)
    with torch.no_grad():
        teacher_hidden, teacher_head = final_hidden_and_head_weight(teacher, **batch)
    rows, targets = supervised_positions(labels)
    got, *_ = chunked_kd_ce(hidden.flatten(0, 1)[rows], teacher_hidden.flatten(0, 1)[rows], head, teacher_head,
                            targets, name=name, kd_ratio=KD_RATIO, temperature=2.0, chunk_size=4, **PARAMS)
    _assert_close(got, want)
    for param, got_grad, want_grad in zip(params, torch.autograd.grad(got, params), want_grads):
        assert got_grad.abs().max() > 0, param.shape
        _assert_close(got_grad, want_grad)

    student.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        final_hidden_and_head_weight(student, **batch)


def _full_path_logits(logits, teacher_logits, labels, name):
    targets = labels[:, 1:]
    mask = targets != IGNORE
    ce = ce_loss(logits[:, :-1], targets.clamp_min(0), mask)
    kd = kd_loss(logits[:, :-1], teacher_logits[:, :-1], mask, name, 2.0, **PARAMS)
    return total_loss(ce, kd, KD_RATIO)
