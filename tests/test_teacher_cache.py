"""The teacher top-k cache against the teacher run directly: full sequences, lead windows, collated
batches, the sparse loss at k = V - 1, the approximation error, broken caches and concurrent builds."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil

import pytest
import torch

from kd_sweeps import teacher_cache, teacher_cache_build
from kd_sweeps.chunked_loss import chunked_kd_ce, final_hidden_and_head_weight, supervised_positions
from kd_sweeps.data import IGNORE_INDEX, collate, training_examples
from kd_sweeps.sections import supervised_tokens
from kd_sweeps.teacher_cache import CacheError, TeacherCache
from kd_sweeps.teacher_cache_build import build_cache
from tests.helpers import encoded_split, tiny_model

TEMPERATURE = 2.0  # not 1: the stored values must be log-probs at the loss temperature
K = 8
FP16_TOL = 4e-3  # fp16 log-probs of magnitude < 8 are within 2**-8; plus fp32 batch-shape noise


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kd_sweeps.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    teacher = tiny_model(tokenizer, seed=0)
    encoded = encoded_split(tokenizer, 24, seed=1)
    folder = tmp_path_factory.mktemp("cache") / "teacher-topk"
    # shard_size 7 over 24 sequences: four shards, the last one partial; batch 5 mixes shards' order.
    cache = build_cache(teacher, encoded, folder, K, TEMPERATURE, batch_size=5, device="cpu", shard_size=7)
    return {"tokenizer": tokenizer, "teacher": teacher, "encoded": encoded, "folder": folder, "cache": cache}


def dense_log_probs(teacher, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """(B, T, V) log_softmax(logits / T) of the teacher, run directly."""
    with torch.no_grad():
        logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.log_softmax(logits.double() / TEMPERATURE, dim=-1)


def assert_is_topk(log_p: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> None:
    """Cached (values, ids) (N, k) are a top-k of dense log-probs (N, V), up to fp16 rounding:
    the values at the ids agree, and no other id scores above the smallest cached one."""
    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    assert values.shape == ids.shape and values.shape[0] == log_p.shape[0]
    torch.testing.assert_close(log_p.gather(1, ids).float(), values, atol=FP16_TOL, rtol=0)
    others = log_p.scatter(1, ids, float("-inf")).max(-1).values  # (N,)
    assert bool((others <= values.min(-1).values + FP16_TOL).all())
    assert bool((values[:, :-1] >= values[:, 1:]).all())  # sorted, descending


def test_build_writes_shards_and_meta(setup):
    cache, encoded = setup["cache"], setup["encoded"]
    meta = json.loads((setup["folder"] / "meta.json").read_text())
    assert cache.built and meta["n_sequences"] == 24 and len(meta["shards"]) == 4
    assert meta["lengths"] == [len(e.input_ids) for e in encoded]
    assert meta["values_dtype"] == "float16" and meta["indices_dtype"] == "int32"
    assert sum(s["rows"] for s in meta["shards"]) == sum(len(e.input_ids) - 1 for e in encoded)
    assert meta["teacher_real_tokens"] == sum(len(e.input_ids) for e in encoded) and meta["teacher_forward_flops"] > 0
    assert not list(setup["folder"].parent.glob("*.tmp*"))  # the temporary folder was renamed
    again = build_cache(setup["teacher"], encoded, setup["folder"], K, TEMPERATURE, 5, "cpu", shard_size=7)
    assert not again.built  # a second call loads


def test_rows_equal_the_teachers_topk_on_full_sequences(setup):
    cache = TeacherCache.load(setup["folder"], verify=True)
    for index, enc in enumerate(setup["encoded"]):
        log_p = dense_log_probs(setup["teacher"], torch.tensor([enc.input_ids]))[0, :-1]  # (L - 1, V)
        values, ids = cache.rows(index, 0, len(enc.input_ids) - 1)
        assert_is_topk(log_p, values, ids)
    values, ids = cache.rows(3, 10, 10)
    assert values.shape == (0, K) and ids.shape == (0, K)
    with pytest.raises(IndexError, match="outside sequence 3"):
        cache.rows(3, 0, len(setup["encoded"][3].input_ids))  # the last token predicts nothing
    with pytest.raises(IndexError, match="not in a cache of 24"):
        cache.rows(24, 0, 1)


@pytest.mark.parametrize("trunc,cut", [(0.3, False), (0.5, False), (0.5, True), (1.0, False)])
def test_teacher_on_a_lead_window_matches_the_cached_prefix(setup, trunc, cut):
    """The prefix property the cache rests on: the teacher run on the kept window alone."""
    cache = setup["cache"]
    for index in (0, 7, 15, 23):
        enc = setup["encoded"][index]
        (start, end), _ = supervised_tokens(len(enc.input_ids), enc.spans, ("CoT", "A"), trunc, "lead",
                                            cut_after_think=cut)
        assert start == 0
        log_p = dense_log_probs(setup["teacher"], torch.tensor([enc.input_ids[:end]]))[0, :-1]  # (end - 1, V)
        assert_is_topk(log_p, *cache.rows(index, 0, end - 1))


@pytest.mark.parametrize("mode", ["lead", "random_labels"])
def test_gather_aligns_with_supervised_positions(setup, mode):
    encoded, teacher, cache = setup["encoded"], setup["teacher"], setup["cache"]
    sections, seed = ("CoT", "A"), 3
    examples, skipped = training_examples(encoded, sections, 0.5, mode, False, seed)
    assert skipped == 0  # so example i is encoded[i]
    chosen = [5, 0, 11, 3, 22]  # different lengths and shards: padding and ordering both matter
    windows, masks = [], []
    for i in chosen:
        window, mask = supervised_tokens(len(encoded[i].input_ids), encoded[i].spans, sections, 0.5, mode,
                                         seed=seed * 1_000_003 + i)
        assert mask == (examples[i].labels != IGNORE_INDEX).tolist()
        windows.append(window)
        masks.append(mask)
    batch = collate([examples[i] for i in chosen], pad_id=0)
    rows, _ = supervised_positions(batch["labels"], IGNORE_INDEX)  # (N,) batch-major then time
    log_p = dense_log_probs(teacher, batch["input_ids"], batch["attention_mask"]).flatten(0, 1)[rows]  # (N, V)
    values, ids = cache.gather(chosen, windows, masks)
    assert values.shape == (len(rows), K)
    assert_is_topk(log_p, values, ids)
    # The labels tensor serves as the mask just as well.
    labels_masks = [examples[i].labels != IGNORE_INDEX for i in chosen]
    torch.testing.assert_close(cache.gather(chosen, windows, labels_masks), (values, ids))
    empty = cache.gather([], [], [])
    assert empty[0].shape == (0, K) and empty[1].dtype == torch.int64


def test_windows_after_token_zero_are_refused(setup):
    enc = setup["encoded"][0]
    teacher_cache.check_truncation("lead")
    teacher_cache.check_truncation("random_labels")
    for mode in ("middle", "right"):
        with pytest.raises(CacheError, match=rf"^train\.teacher_cache=topk needs .*truncation.mode='{mode}'.*"
                                             r"\(train\.teacher_cache=none\)"):  # the config keys a user sets
            teacher_cache.check_truncation(mode)
        window, mask = supervised_tokens(len(enc.input_ids), enc.spans, ("CoT",), 0.5, mode)
        with pytest.raises(CacheError, match="starts after token 0"):
            setup["cache"].gather([0], [window], [mask])


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_loss_from_the_cache_at_k_v_minus_1_equals_the_dense_loss(setup, tmp_path, name):
    """With k = V - 1 the rest bucket is a single id: the bucketed loss is the dense one, up to the
    fp16 storage of the teacher's log-probs."""
    encoded, teacher = setup["encoded"][:8], setup["teacher"]
    vocab = teacher.get_output_embeddings().weight.shape[0]
    cache = build_cache(teacher, encoded, tmp_path / "full", vocab - 1, TEMPERATURE, 8, "cpu")
    examples, _ = training_examples(encoded, ("CoT", "A"), 0.5, "lead", False, 0)
    batch = collate(examples, pad_id=0)
    windows = [(0, len(e.input_ids)) for e in examples]
    masks = [e.labels != IGNORE_INDEX for e in examples]
    rows, targets = supervised_positions(batch["labels"], IGNORE_INDEX)
    student = tiny_model(setup["tokenizer"], seed=1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_hidden, teacher_weight = final_hidden_and_head_weight(teacher, **inputs)
    losses, grads = [], []
    for sparse in (False, True):
        hidden, weight = final_hidden_and_head_weight(student, **inputs)  # (B, T, H), (V, H)
        picked = hidden.flatten(0, 1)[rows]  # (N, H)
        picked.retain_grad()
        teacher_args = ((None, None, {"teacher_topk": cache.gather(range(8), windows, masks)}) if sparse else
                        (teacher_hidden.flatten(0, 1)[rows], teacher_weight, {}))
        total, _, kd, _ = chunked_kd_ce(picked, teacher_args[0], weight, teacher_args[1], targets, name=name,
                                        kd_ratio=0.7, temperature=TEMPERATURE, chunk_size=64, **teacher_args[2])
        total.backward()
        losses.append(torch.stack([total.detach(), kd]))
        grads.append(picked.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=1e-4)
    # fp16 rounds a log-prob of magnitude 4-8 by up to 2e-3, which reverse KL's gradient carries
    # straight through: ~2e-3 of the gradient's norm, ~1% of its largest element (1e-3 here).
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 4e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=2e-5)


def test_approximation_error_against_a_plain_reference(setup, tmp_path):
    encoded, teacher, cache = setup["encoded"][:3], setup["teacher"], None
    cache = build_cache(teacher, encoded, tmp_path / "k8", K, TEMPERATURE, 2, "cpu")
    error = teacher_cache_build.approximation_error(teacher, encoded, cache, TEMPERATURE, batch_size=2)
    kls, tails = [], []
    vocab = teacher.get_output_embeddings().weight.shape[0]
    for index, enc in enumerate(encoded):
        log_p = dense_log_probs(teacher, torch.tensor([enc.input_ids]))[0, :-1]  # (L - 1, V) float64
        _, ids = cache.rows(index, 0, len(enc.input_ids) - 1)
        p = log_p.exp()
        tail = 1.0 - p.gather(1, ids).sum(-1, keepdim=True)  # (L - 1, 1)
        approx = (tail / (vocab - K)).expand_as(p).scatter(1, ids, p.gather(1, ids))  # the top-k + even tail
        kls.append((p * (log_p - approx.log())).sum(-1))
        tails.append(tail[:, 0])
    kls, tails = torch.cat(kls), torch.cat(tails)
    assert error["n_positions"] == len(kls) and error["k"] == K
    assert error["kl_mean"] == pytest.approx(kls.mean().item(), rel=1e-4)
    assert error["kl_max"] == pytest.approx(kls.max().item(), rel=1e-4)
    assert error["tail_mass_mean"] == pytest.approx(tails.mean().item(), rel=1e-4)
    assert 0 < error["bucket_tv_mean"] <= error["bucket_tv_max"] < 2e-3  # fp16 rounding only
    with pytest.raises(CacheError, match="temperature"):
        teacher_cache_build.approximation_error(teacher, encoded, cache, 1.0)
    full = build_cache(teacher, encoded, tmp_path / "all", vocab - 1, TEMPERATURE, 2, "cpu")
    assert teacher_cache_build.approximation_error(teacher, encoded, full, TEMPERATURE)["kl_max"] < 1e-6


def test_truncated_or_corrupted_shards_give_clear_errors(setup, tmp_path):
    meta = json.loads((setup["folder"] / "meta.json").read_text())
    shard = meta["shards"][1]["file"]

    def broken_copy(name: str, damage) -> str:
        folder = tmp_path / name
        shutil.copytree(setup["folder"], folder)
        path = folder / shard
        data = bytearray(path.read_bytes())
        path.write_bytes(damage(data))
        return str(folder)

    with pytest.raises(CacheError, match=rf"{shard} is missing or truncated.*delete .* to rebuild"):
        TeacherCache.load(broken_copy("truncated", lambda d: d[: len(d) // 2]))

    def garble_header(data):
        data[8:24] = b"\xff" * 16
        return data

    with pytest.raises(CacheError, match=rf"{shard} is unreadable"):
        TeacherCache.load(broken_copy("header", garble_header))

    def flip_last_byte(data):
        data[-1] ^= 0xFF
        return data

    folder = broken_copy("flipped", flip_last_byte)
    TeacherCache.load(folder)  # size and header still fine: only the checksum sees it
    with pytest.raises(CacheError, match=rf"{shard} is corrupted"):
        TeacherCache.load(folder, verify=True)
    os.remove(os.path.join(folder, "meta.json"))
    with pytest.raises(CacheError, match="no readable teacher cache"):
        TeacherCache.load(folder)


def test_a_mismatched_dataset_gives_a_clear_error(setup):
    encoded, cache = setup["encoded"], setup["cache"]
    with pytest.raises(CacheError, match="was built for 24 sequences of these lengths; the data has 23"):
        cache.check(encoded[:23])
    swapped = [encoded[1], encoded[0], *encoded[2:]]
    if len(encoded[0].input_ids) != len(encoded[1].input_ids):
        with pytest.raises(CacheError, match="sequence 0 has"):
            cache.check(swapped)
    edited = list(encoded)
    edited[4] = type(encoded[4])([*encoded[4].input_ids[:-1], 0], encoded[4].spans)  # same length
    with pytest.raises(CacheError, match="same lengths, other token ids"):
        cache.check(edited)
    with pytest.raises(CacheError, match="was built for 24 sequences"):
        build_cache(setup["teacher"], encoded[:20], setup["folder"], K, TEMPERATURE, 5, "cpu")
    with pytest.raises(CacheError, match="k=8 at temperature 2.0, asked for k=4"):
        build_cache(setup["teacher"], encoded, setup["folder"], 4, TEMPERATURE, 5, "cpu")


def test_cache_key_names_every_field():
    args = {"teacher_id": "teacher-abc", "dataset_fingerprint": "f00", "formatting": "paper", "max_tokens": 4096,
            "k": 16, "temperature": 1.0}
    key = teacher_cache.cache_key(**args)
    assert key == teacher_cache.cache_key(**{**args, "temperature": 1})  # 1 and 1.0 are one temperature
    changed = {"teacher_id": "other", "dataset_fingerprint": "f01", "formatting": "plain", "max_tokens": 2048,
               "k": 32, "temperature": 2.0}
    for field, value in changed.items():
        assert teacher_cache.cache_key(**{**args, field: value}) != key, field


def _build_in_child(folder, barrier, results) -> None:
    """One grid point's process: same teacher and data, build (or wait for) the cache."""
    torch.set_num_threads(1)
    from kd_sweeps.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    teacher, encoded = tiny_model(tokenizer, seed=0), encoded_split(tokenizer, 12, seed=5)
    barrier.wait()  # both processes reach build_cache together
    cache = build_cache(teacher, encoded, folder, K, TEMPERATURE, 4, "cpu", shard_size=5)
    results.put((os.getpid(), cache.built, cache.meta["built_by_pid"]))


@pytest.mark.slow  # two spawned processes (about 5 s)
def test_two_processes_build_the_cache_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    folder = str(tmp_path / "shared-cache")
    workers = [context.Process(target=_build_in_child, args=(folder, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(built for _, built, _ in reports) == [False, True]
    builder = next(pid for pid, built, _ in reports if built)
    assert {by for _, _, by in reports} == {builder}
    assert not list(tmp_path.glob("shared-cache.tmp*"))
    assert math.isclose(json.loads((tmp_path / "shared-cache" / "meta.json").read_text())["temperature"],
                        TEMPERATURE)


def test_a_bf16_build_stores_the_top_k_of_the_teacher_run_under_autocast(setup, tmp_path):
    """With train.precision=bf16 the online teacher runs under bf16 autocast; the cache built with
    ``autocast=True`` holds that teacher's top-k (not the fp32 one's), and says so in its key."""
    encoded, teacher = setup["encoded"][:4], setup["teacher"]
    fields = teacher_cache.key_fields("t", "d", "f", 4096, K, TEMPERATURE, precision="bf16")
    assert fields["precision"] == "bf16" and "precision" not in teacher_cache.key_fields(
        "t", "d", "f", 4096, K, TEMPERATURE)
    assert teacher_cache.cache_key("t", "d", "f", 4096, K, TEMPERATURE, "bf16") != \
        teacher_cache.cache_key("t", "d", "f", 4096, K, TEMPERATURE)
    cache = build_cache(teacher, encoded, tmp_path / "bf16", K, TEMPERATURE, 2, "cpu", key=fields, autocast=True)
    assert cache.meta["autocast_bf16"] is True and cache.meta["key"]["precision"] == "bf16"
    largest_fp32_gap = 0.0
    for index, enc in enumerate(encoded):
        ids = torch.tensor([enc.input_ids])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = dense_log_probs(teacher, ids)[0, :-1]  # (L - 1, V)
        values, top = cache.rows(index, 0, len(enc.input_ids) - 1)
        assert_is_topk(bf16, values, top)
        fp32 = dense_log_probs(teacher, ids)[0, :-1]
        largest_fp32_gap = max(largest_fp32_gap, (fp32.gather(1, top).float() - values).abs().max().item())
    assert largest_fp32_gap > FP16_TOL  # the two precisions really differ: the key must tell them apart


def test_a_point_reading_a_built_cache_never_loads_the_teacher(tmp_path, monkeypatch):
    """The first point builds the cache (teacher loaded); a later point of the sweep only reads it
    and trains exactly as it would with the teacher loaded, without preparing or loading it."""
    from kd_sweeps import models, run, teachers
    from tests.conftest import compose_config
    from tests.helpers import FAST

    monkeypatch.setenv("KD_SWEEPS_CACHE", str(tmp_path / "cache"))

    def point(trunc: float, folder: str) -> dict:
        cfg = compose_config([*FAST, f"trunc={trunc}", "train.teacher_cache=topk", "train.teacher_topk=8",
                              "logger=disabled"])
        cfg.output_dir = str(tmp_path / folder)
        return run.main(cfg)

    first = point(1.0, "first")
    assert first["teacher_cache_built_here"] and first["teacher_loaded"]
    prepared = []
    real_prepare = models.prepare_embedded
    monkeypatch.setattr(models, "prepare_embedded",
                        lambda spec, role, *a, **k: prepared.append(role) or real_prepare(spec, role, *a, **k))
    reader = point(0.5, "reader")
    assert prepared == ["base"] and not reader["teacher_loaded"] and not reader["teacher_cache_built_here"]
    assert reader["teacher_cache_path"] == first["teacher_cache_path"]
    assert reader["teacher_accuracy"] == first["teacher_accuracy"]  # from the teacher's record, not its weights
    monkeypatch.setattr(teachers, "_ready_stand_in", lambda *a: None)  # as before: the teacher is loaded
    loaded = point(0.5, "loaded")
    assert prepared == ["base", "teacher", "base"] and loaded["teacher_loaded"]
    for key in ("final_loss", "final_kd_loss", "train_flops", "tokens_supervised"):
        assert reader[key] == loaded[key], key
