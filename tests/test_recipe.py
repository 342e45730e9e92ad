"""The paper's recipe (train=paper): the loss weighting against a hand-computed float64 batch however
the batch is split, the batch split over ranks, OneCycleLR as the paper called it, AdamW's decay
groups, steps from epochs, random_labels redrawn every epoch, and the progress lines."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from kd_sweeps import data, distributed, recipe, teachers, train
from kd_sweeps.distributed import DistEnv
from kd_sweeps.schema import LossConfig, TrainConfig
from tests.conftest import compose_config
from tests.helpers import tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

KD_RATIO = 0.5



@pytest.fixture(scope="module")
def setup():
    tokenizer, examples, student, teacher = tiny_setup(16)
    return tokenizer, examples, student.double(), teacher.double()


def hand_computed(student, teacher, examples, normalize: str) -> torch.Tensor:
    """The objective written out, one unpadded sequence at a time, in float64: per supervised token
    (1 - r) * CE + r * KL(p_T || p_S); then each sequence's mean averaged over the sequences
    (sequence), or the sum over all tokens / their count (token)."""
    per_sequence = []
    for example in examples:
        ids = example.input_ids[None]  # (1, T)
        targets = example.labels[1:]  # (T-1,) token t+1 is predicted at position t
        keep = targets != data.IGNORE_INDEX
        log_s = F.log_softmax(student(input_ids=ids).logits[0, :-1][keep], -1)  # (n, V)
        with torch.no_grad():
            log_t = F.log_softmax(teacher(input_ids=ids).logits[0, :-1][keep], -1)  # (n, V)
        ce = -log_s.gather(1, targets[keep][:, None])[:, 0]  # (n,)
        kl = (log_t.exp() * (log_t - log_s)).sum(1)  # (n,)
        per_sequence.append((1 - KD_RATIO) * ce + KD_RATIO * kl)
    if normalize == "sequence":
        return torch.stack([tokens.mean() for tokens in per_sequence]).mean()
    return torch.cat(per_sequence).sum() / sum(len(tokens) for tokens in per_sequence)


def split_step(student, teacher, chosen, normalize, impl, world_size, micro):
    """One step's loss value and gradients with ``chosen`` split over ``world_size`` simulated ranks
    (their gradients added, as FSDP's sum does) and micro-batches of ``micro``."""
    model = copy.deepcopy(student)
    loss = LossConfig(kd_ratio=KD_RATIO, normalize=normalize)
    n_supervised = sum(e.n_supervised for e in chosen)
    value = 0.0
    for rank in range(world_size):
        env = DistEnv(rank=rank, world_size=world_size)
        mine = distributed.rank_slice(chosen, env)
        (_, _, total), _ = train.accumulate_gradients(
            model, teacher, mine, 0, distributed.micro_batch_size(len(chosen), micro, env), n_supervised,
            len(chosen), loss, False, impl, torch.device("cpu"))
        value += total
    return value, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["chunked", "full"])
@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_loss_weighting_matches_the_hand_computed_batch_however_split(setup, normalize, impl):
    _, examples, student, teacher = setup
    chosen = examples[:4]
    counts = [e.n_supervised for e in chosen]
    assert len(set(counts)) > 1, counts  # unequal sequences: the two weightings differ
    expected, values = {}, {}
    for weighting in ("sequence", "token"):
        reference_model = copy.deepcopy(student)
        values[weighting] = hand_computed(reference_model, teacher, chosen, weighting)
        values[weighting].backward()
        expected[weighting] = {name: p.grad for name, p in reference_model.named_parameters()}
    # The test would see the wrong weighting: the two gradients differ far beyond the tolerance.
    head = "lm_head.weight" if "lm_head.weight" in expected["token"] else "model.embed_tokens.weight"
    assert (expected["token"][head] - expected["sequence"][head]).abs().max() > 1e-5
    reference, expected = values[normalize], expected[normalize]
    # One forward; two accumulated micro-batches; two ranks accumulating two each; four ranks.
    for world_size, micro in [(1, None), (1, 2), (2, 1), (4, 1)]:
        value, grads = split_step(student, teacher, chosen, normalize, impl, world_size, micro)
        assert value == pytest.approx(reference.item(), rel=1e-10), (world_size, micro)
        # float64, but the rotary tables are computed in fp32 by a matmul whose rounding depends on the
        # padded length of the micro-batch: ~1e-10 in the weights before attention, none elsewhere.
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-7, atol=1e-9, msg=f"{name} {world_size}x{micro}")


def test_the_paper_batch_runs_on_1_2_4_ranks_and_8_is_refused_by_name():
    cfg = compose_config(["train=paper"])
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.loss.normalize) == (4, 1, "sequence")
    for world_size, accumulation in [(1, 4), (2, 2), (4, 1)]:
        env = DistEnv(world_size=world_size)
        assert distributed.micro_batch_size(4, 1, env) == 1
        assert distributed.accumulation_steps(4, 1, env) == accumulation
    with pytest.raises(ValueError, match=r"train.batch_size=4 cannot be split over 8 processes"):
        distributed.micro_batch_size(4, 1, DistEnv(world_size=8))
    with pytest.raises(ValueError, match=r"train.micro_batch_size=3: .* 4 of train.batch_size=8"):
        distributed.micro_batch_size(8, 3, DistEnv(world_size=2))
    assert distributed.micro_batch_size(32, None, DistEnv()) == 32  # train=tiny: one micro-batch


def _lrs_and_beta1(settings: TrainConfig) -> tuple[list[float], list[float]]:
    optimizer = train.build_optimizer(torch.nn.Linear(1, 1), settings)
    schedule = train.build_schedule(optimizer, settings)
    lrs, beta1 = [], []
    for _ in range(settings.max_steps):
        lrs.append(schedule.get_last_lr()[0])
        beta1.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        schedule.step()
    return lrs, beta1


def test_onecycle_is_the_papers_schedule():
    settings = TrainConfig(max_steps=100, batch_size=4, lr=4e-6, schedule="onecycle", betas=(0.9, 0.999))
    lrs, beta1 = _lrs_and_beta1(settings)
    assert lrs[0] == pytest.approx(4e-6 / 25)  # div_factor 25
    assert max(lrs) == pytest.approx(4e-6) and lrs.index(max(lrs)) == 9  # the peak after 10 % of the steps
    assert lrs[-1] == pytest.approx(4e-6 / 25 / 1e4)  # final_div_factor 1e4
    assert all(a <= b for a, b in zip(lrs[:9], lrs[1:10])) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    # torch's default cycle_momentum, which the paper kept: beta1 follows the schedule in reverse.
    assert (beta1[0], beta1[9], beta1[-1]) == (pytest.approx(0.95), pytest.approx(0.85), pytest.approx(0.95))
    # A warm-up of exactly one step (10 % of 10), where torch's OneCycleLR divides by zero unless
    # nudged: the lrs of a warm-up a hair longer, lr / 25 first and then the annealing.
    short = _lrs_and_beta1(TrainConfig(max_steps=10, batch_size=4, lr=1.0, schedule="onecycle"))[0]
    assert short[0] == pytest.approx(1.0 / 25) and 0.9 < short[1] < 1.0
    assert all(a > b for a, b in zip(short[1:], short[2:]))


def test_decay_on_every_parameter_or_matrices_only(setup):
    _, _, student, _ = setup
    paper_like = TrainConfig(max_steps=1, batch_size=4, decay_norms_and_biases=True, betas=(0.9, 0.999))
    everything = train.build_optimizer(student, paper_like)
    assert [g["weight_decay"] for g in everything.param_groups] == [0.05]
    assert len(everything.param_groups[0]["params"]) == len(list(student.parameters()))
    assert everything.param_groups[0]["betas"] == (0.9, 0.999)
    matrices = train.build_optimizer(student, TrainConfig(max_steps=1, batch_size=4))
    assert [g["weight_decay"] for g in matrices.param_groups] == [0.05, 0.0]
    assert all(p.ndim < 2 for p in matrices.param_groups[1]["params"]) and matrices.param_groups[1]["params"]


@pytest.mark.parametrize("bf16_here", [True, False])
def test_settled_config_resolves_precision_and_derives_steps(monkeypatch, bf16_here):
    from kd_sweeps import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: bf16_here)
    paper = recipe.settled_config(compose_config(["train=paper"]), torch.device("cpu"), 8001)
    assert paper.train.max_steps == 4001  # ceil(2 epochs x 8,001 rows / 4)
    assert paper.train.precision == ("bf16" if bf16_here else "fp32")
    tiny = recipe.settled_config(compose_config(["train.max_steps=150", "train.precision=fp32"]), torch.device("cpu"),
                              4000)
    assert (tiny.train.max_steps, tiny.train.precision) == (150, "fp32")  # explicit values stay


def test_random_labels_are_redrawn_every_epoch_deterministically(setup):
    tokenizer, _, _, _ = setup
    from kd_sweeps.synthetic import make_split

    encoded, _ = data.encode(make_split(8, seed=0), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("P", "CoT", "A"), 0.5, "random_labels", False, 42)
    again, _ = data.training_examples(encoded, ("P", "CoT", "A"), 0.5, "random_labels", False, 42)
    full, _ = data.training_examples(encoded, ("P", "CoT", "A"), 1.0, "random_labels", False, 42)
    for example, twin, every in zip(examples, again, full):
        n = every.n_supervised
        assert example.n_supervised == n - round(0.5 * n)  # the paper drops round(r * n), r = 1 - trunc
        draws = [example.for_epoch(epoch).labels for epoch in range(3)]
        for labels in draws:
            kept = labels != data.IGNORE_INDEX
            assert int(kept.sum()) == example.n_supervised
            assert torch.equal(labels[kept], every.labels[kept])  # a subset of the sections' targets
        assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
        assert torch.equal(draws[2], twin.for_epoch(2).labels)  # a pure function of (seed, epoch, index)
    lead, _ = data.training_examples(encoded, ("P", "CoT", "A"), 0.5, "lead", False, 42)
    assert lead[0].for_epoch(3) is lead[0]


def test_random_labels_train_with_the_teacher_cache_over_epochs(setup, tmp_path):
    """The cache serves whichever labels an epoch draws: the same losses as the online teacher."""
    from kd_sweeps import teacher_cache_build
    from kd_sweeps.synthetic import make_split

    tokenizer, _, student, teacher = setup
    teacher = copy.deepcopy(teacher).float()
    encoded, _ = data.encode(make_split(16, seed=0), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("CoT", "A"), 0.5, "random_labels", False, 0)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    cache = teacher_cache_build.build_cache(teacher, encoded, tmp_path / "cache", vocab - 1, 1.0, 8,
                                      torch.device("cpu"))
    settings = TrainConfig(max_steps=4, batch_size=8, lr=1e-2, precision="fp32")  # 2 epochs
    results = []
    for kd_teacher in (teacher, teachers.CachedTeacher(cache)):
        losses = []
        train.train_loop(copy.deepcopy(student).float(), kd_teacher, examples, tokenizer.pad_token_id, settings,
                         LossConfig(kd_ratio=1.0, normalize="sequence"), torch.device("cpu"),
                         on_step=lambda step, metrics, micro: losses.append(metrics["kd_loss"]))
        results.append(losses)
    assert results[0] == pytest.approx(results[1], rel=1e-2, abs=1e-3)
    assert results[0][0] > 0.01  # a real divergence, not two zeros


def test_progress_lines_outside_a_terminal(setup, caplog):
    tokenizer, examples, student, teacher = setup
    settings = TrainConfig(max_steps=20, batch_size=2, lr=1e-3, precision="fp32")
    with caplog.at_level(logging.INFO, logger="kd_sweeps.train"):
        train.train_loop(copy.deepcopy(student), None, examples, tokenizer.pad_token_id, settings,
                         LossConfig(kd_ratio=0.0), torch.device("cpu"), desc="demo")
    lines = [r.getMessage() for r in caplog.records if r.name == "kd_sweeps.train"]
    assert len(lines) == 10, lines  # one per 10 % of 20 steps (pytest's stderr is not a terminal)
    assert lines[0].startswith("demo: step 2/20 (10%), loss ") and "steps/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("demo: step 20/20 (100%)") and lines[-1].endswith("0m 00s left")
