"""Checks the FLOPs formula by hand and against FlopCounterMode on tiny models."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from kd_sweeps.cost import (
    CostMeter,
    ModelShape,
    attention_flops,
    forward_flops,
    generation_flops,
    kd_step_flops,
    peak_memory_bytes,
    reset_peak_memory,
)

transformers = pytest.importorskip("transformers")

B, T = 4, 48
TOL = 0.10  # formula / measured must lie within 1 +- TOL

# n_layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10
TINY = ModelShape(2, 8, 2, 1, 4, 16, 10, tied_embeddings=True)


# ---------------------------------------------------------------- by hand
def test_matmul_params_by_hand():
    # q: 8 x (2*4) = 64, k and v: 8 x (1*4) = 32 each, o: (2*4) x 8 = 64 -> 192
    # gated MLP: 3 * 8 * 16 = 384; one layer 192 + 384 = 576; two layers 1152
    # output layer: 10 * 8 = 80 -> 1232
    assert TINY.layer_matmul_params() == 576
    assert TINY.matmul_params() == 1232


def test_forward_flops_by_hand():
    # Sequences of 3 and 5 tokens, 8 tokens in all.
    # weight matmuls: 2 FLOPs * 1232 weights * 8 tokens = 19712
    # attention per layer per sequence: 2 matmuls * 2 FLOPs * 2 heads * 4 dims * T^2 = 32 T^2
    #   T=3: 288, T=5: 800 -> 1088 per layer, 2176 for two layers
    assert attention_flops(TINY, 3) == 2 * 288
    assert forward_flops(TINY, [3, 5]) == 19712 + 2176 == 21888
    assert forward_flops(TINY, []) == 0


def test_kd_step_flops_by_hand():
    teacher = ModelShape(1, 8, 2, 2, 4, 8, 10, tied_embeddings=False)
    # teacher: q,k,v,o 4 * 64 = 256, MLP 3 * 8 * 8 = 192, output layer 80 -> 528
    # forward on [3, 5]: 2 * 528 * 8 = 8448 + one layer of attention 1088 = 9536
    step = kd_step_flops(TINY, teacher, [3, 5])
    assert step == {"student": 3 * 21888, "teacher": 9536, "total": 3 * 21888 + 9536}
    assert kd_step_flops(TINY, None, [3, 5]) == {"student": 3 * 21888, "teacher": 0, "total": 3 * 21888}


def test_generation_flops_by_hand():
    # Prompt of 3 tokens: forward(3) = 2 * 1232 * 3 + 2 layers * 32 * 3^2 = 7392 + 576 = 7968.
    # Then 2 generated tokens at contexts 4 and 5: weights 2 * 1232 each = 4928, attention
    # 2 layers * 4 * 2 heads * 4 dims * c = 64 c -> 64 * (4 + 5) = 576.
    assert generation_flops(TINY, 3, 2) == 7968 + 4928 + 576 == 13472
    assert generation_flops(TINY, 3, 0) == forward_flops(TINY, [3])
    # The same sum written as a loop over decode steps, at a long length (no closed-form slip).
    prompt, new = 57, 1000
    loop = forward_flops(TINY, [prompt]) + sum(2 * TINY.matmul_params() + 64 * (prompt + i)
                                               for i in range(1, new + 1))
    assert generation_flops(TINY, prompt, new) == loop
    with pytest.raises(ValueError, match="must be >= 0"):
        generation_flops(TINY, 3, -1)


def test_from_config_reads_llama_and_qwen_fields():
    llama = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    # head_dim not given -> 64 // 4 = 16
    assert ModelShape.from_config(llama) == ModelShape(3, 64, 4, 2, 16, 128, 100, tied_embeddings=False)
    qwen = transformers.Qwen3Config(
        vocab_size=60, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=48, tie_word_embeddings=True,
    )
    assert ModelShape.from_config(qwen) == ModelShape(2, 64, 2, 1, 48, 256, 60, tied_embeddings=True)


def test_halving_length_halves_linear_flops():
    shape = ModelShape(4, 512, 8, 8, 64, 2048, 1000)
    full, half = forward_flops(shape, [256] * 2), forward_flops(shape, [128] * 2)
    attn_full, attn_half = 2 * attention_flops(shape, 256), 2 * attention_flops(shape, 128)
    assert attn_half * 4 == attn_full  # quadratic term quarters
    assert (half - attn_half) * 2 == full - attn_full  # linear term halves exactly
    assert 0.45 < half / full <= 0.5  # linear term dominates at this length


# ---------------------------------------------------------------- CostMeter
def test_cost_meter_accumulates_padded_steps():
    teacher = ModelShape(1, 8, 2, 2, 4, 8, 10)
    meter = CostMeter(TINY, teacher)
    meter.add_step((2, 5), [3, 5], n_supervised=6)
    meter.add_step((3, 4), [4, 4, 1], n_supervised=2)
    want = [kd_step_flops(TINY, teacher, [5, 5]), kd_step_flops(TINY, teacher, [4, 4, 4])]
    assert meter.flops_student == sum(s["student"] for s in want)
    assert meter.flops_teacher == sum(s["teacher"] for s in want)
    assert meter.flops_total == meter.flops_student + meter.flops_teacher
    assert meter.summary() == {
        "train_flops": sum(s["total"] for s in want),
        "train_flops_student": meter.flops_student,
        "train_flops_teacher": meter.flops_teacher,
        "tokens_trained": 8 + 9,
        "tokens_supervised": 6 + 2,
        "tokens_padded": (10 - 8) + (12 - 9),
    }


def test_cost_meter_without_teacher_and_bad_input():
    meter = CostMeter(TINY, None)
    meter.add_step((1, 5), [5], n_supervised=5)
    assert meter.summary()["train_flops_teacher"] == 0
    assert meter.summary()["train_flops"] == 3 * forward_flops(TINY, [5])
    with pytest.raises(ValueError):
        meter.add_step((2, 5), [5], n_supervised=1)  # one length for two rows
    with pytest.raises(ValueError):
        meter.add_step((1, 5), [6], n_supervised=1)  # longer than the padded length
    with pytest.raises(ValueError):
        meter.add_step((1, 5), [4], n_supervised=5)  # more supervised than real tokens


# ---------------------------------------------------------------- FlopCounterMode
# PyTorch's counter has no formula for the CPU flash-attention kernel that SDPA
# dispatches to here, so it would report zero attention FLOPs. Charge that
# kernel with the counter's own SDPA formulas (full T x T, as on CUDA).
_aten = torch.ops.aten
CPU_SDPA = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad_out, q, k, v),
}


def _qwen3(impl, **overrides):
    kwargs = dict(
        vocab_size=60, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    cfg = transformers.Qwen3Config(**kwargs)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM._from_config(cfg, attn_implementation=impl).eval(), cfg


def _counter():
    return FlopCounterMode(display=False, custom_mapping=CPU_SDPA)


def _ids(vocab):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("vocab", [60, 4000])
def test_forward_matches_flop_counter(impl, vocab):
    model, cfg = _qwen3(impl, vocab_size=vocab)
    shape = ModelShape.from_config(cfg)
    counter = _counter()
    with torch.no_grad(), counter:
        model(input_ids=_ids(vocab))
    measured = counter.get_total_flops()
    assert abs(forward_flops(shape, [T] * B) / measured - 1) < TOL
    # Same matmuls, counted the same way: exact, not just close.
    assert forward_flops(shape, [T] * B) == measured
    # The output layer alone: 2 FLOPs * vocab * hidden per token, exactly.
    lm_head = sum(counter.get_flop_counts()["Qwen3ForCausalLM.lm_head"].values())
    assert lm_head == 2 * vocab * cfg.hidden_size * B * T
    if vocab == 4000:
        # 4000 * 64 = 256000 output weights vs 2 * 65536 layer weights:
        # the output layer is about two thirds of the forward.
        assert 0.6 < lm_head / measured < 0.7


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_forward_backward_matches_flop_counter(impl):
    model, cfg = _qwen3(impl)
    model.train()
    counter = _counter()
    with counter:
        model(input_ids=_ids(cfg.vocab_size)).logits.float().sum().backward()
    student = kd_step_flops(ModelShape.from_config(cfg), None, [T] * B)["student"]
    assert abs(student / counter.get_total_flops() - 1) < TOL
    if impl == "eager":
        # Every matmul's backward is two matmuls of the same size: exactly 3x.
        assert student == counter.get_total_flops()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kd_step_matches_flop_counter(impl):
    student, s_cfg = _qwen3(impl)
    # A different teacher: deeper, wider, grouped-query attention, untied.
    teacher, t_cfg = _qwen3(
        impl, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    )
    student.train()
    ids = _ids(s_cfg.vocab_size)
    counter = _counter()
    with counter:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        s_logits = student(input_ids=ids).logits
        loss = F.kl_div(
            F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1),
            log_target=True, reduction="batchmean",
        )
        loss.backward()
    want = kd_step_flops(ModelShape.from_config(s_cfg), ModelShape.from_config(t_cfg), [T] * B)
    assert abs(want["total"] / counter.get_total_flops() - 1) < TOL
    if impl == "eager":
        assert want["total"] == counter.get_total_flops()


def test_generation_matches_flop_counter_of_a_kv_cache_loop():
    # Prefill the prompt, then feed each generated token with the cache: the matmuls a decoding
    # engine runs. Eager attention, so the score and value products are plain counted matmuls.
    model, cfg = _qwen3("eager", num_key_value_heads=1)
    prompt, new = 11, 7
    ids = _ids(cfg.vocab_size)[:1, :prompt]
    counter = _counter()
    with torch.no_grad(), counter:
        out = model(input_ids=ids, use_cache=True)
        for _ in range(new):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, cache=out.cache, use_cache=True)  # transformers 5: `cache`
    assert generation_flops(ModelShape.from_config(cfg), prompt, new) == counter.get_total_flops()


@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_sdpa_count_is_full_square_whatever_is_causal(is_causal):
    # The CUDA kernels' flop formulas can be exercised on meta tensors: the
    # counter charges the full T x T product even with is_causal, as the
    # attention term of the formula does.
    shape = ModelShape(1, 64, 4, 4, 16, 1, 1)
    q = torch.empty(2, 4, 64, 16, device="meta")  # (batch, heads, T, head_dim)
    for kernel in (
        lambda: _aten._scaled_dot_product_efficient_attention(q, q, q, None, False, is_causal=is_causal),
        lambda: _aten._scaled_dot_product_flash_attention(q, q, q, is_causal=is_causal),
        lambda: F.scaled_dot_product_attention(q, q, q, is_causal=is_causal),  # math path on meta
    ):
        counter = FlopCounterMode(display=False)
        with counter:
            kernel()
        assert counter.get_total_flops() == 2 * attention_flops(shape, 64)


# ---------------------------------------------------------------- memory
def test_cpu_peak_memory_grows_after_big_allocation():
    # A fresh interpreter, and a tensor big enough to pass the peak already
    # reached: the RSS peak lasts the whole process, and importing torch alone
    # briefly holds more than it keeps.
    script = textwrap.dedent(
        """
        import os
        import torch
        from kd_sweeps.cost import peak_memory_bytes, reset_peak_memory
        reset_peak_memory("cpu")
        before = peak_memory_bytes("cpu")
        try:  # resident bytes now (Linux); elsewhere assume a 512 MiB gap to the peak
            with open("/proc/self/statm") as f:
                resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            resident = before - 512 * 2**20
        extra = 200 * 2**20  # bytes above the old peak
        big = torch.ones((max(before - resident, 0) + extra) // 4)  # float32, written so it is resident
        after = peak_memory_bytes(torch.device("cpu"))
        print(before, after)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    before, after = (int(x) for x in out.stdout.split())
    assert before > 0
    assert after - before > 150 * 2**20  # of the 200 MiB asked for; allow for RSS accounting slack


def test_peak_memory_in_process_is_positive_int():
    peak = peak_memory_bytes("cpu")
    assert isinstance(peak, int) and peak > 10 * 2**20  # a Python process with torch is far above 10 MiB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_tracks_allocations():
    reset_peak_memory("cuda")
    base = peak_memory_bytes("cuda")
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB
    assert peak_memory_bytes("cuda") - base >= 64 * 2**20
    del x
    reset_peak_memory("cuda")
    assert peak_memory_bytes("cuda") < base + 64 * 2**20
