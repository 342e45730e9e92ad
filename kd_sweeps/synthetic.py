"""The embedded task: repeated addition or subtraction on a 0-9 dial, with a real prompt / chain of
thought / answer.

A problem is a start digit, a step (``add 7`` or ``subtract 3``) and a count (2..12), all modulo
10. The chain of thought restates the problem, then works one numbered line per
repetition (``3: 8+7=5``) and states the result; the answer repeats it in ``\\boxed{}``. Each
line reads the previous line's digit, the step and (to know when to stop) the count, so the answer
needs every step, yet each line only needs nearby or unique tokens: a sub-million-parameter model
learns it on a CPU in minutes. Sequence lengths vary about 2x between 2 and 12 repetitions, so
truncation cuts different sections of different examples, as it does on real reasoning traces.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass

MODULUS = 10  # a 0-9 dial: one-digit values, one-token arithmetic
# Steps a problem can use. Few on purpose: each line's arithmetic is a table over (digit, step), and
# small networks learn modular tables slowly; a handful of steps keeps the table small while the
# answer still needs every line of the chain.
STEPS = (1, 3, -1, -3)
# The problem space is small (10 starts x 4 steps x 11 counts = 440), so the held-out split is a fixed
# 30% of the (start, step, count) combinations that training never sees: a test problem is always
# new, while every (digit, step) line it needs occurs in other training problems.
HELD_OUT_FRACTION = 0.3
# Another fixed 10% of the combinations is the validation split (checkpoint selection): disjoint from
# the test split and from the KD training split, so selecting a checkpoint never sees either.
VALIDATION_FRACTION = 0.1
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Problem:
    start: int
    step: int  # signed: +7 adds 7, -3 subtracts 3
    count: int  # repetitions

    @property
    def values(self) -> list[int]:
        """Running value after each repetition (len == count)."""
        return [(self.start + self.step * (k + 1)) % MODULUS for k in range(self.count)]

    @property
    def answer(self) -> int:
        return self.values[-1]


def sample_problem(rng: random.Random, min_steps: int, max_steps: int) -> Problem:
    """Draw one problem: start digit, signed step, count."""
    count = rng.randint(min_steps, max_steps)
    return Problem(rng.randint(0, MODULUS - 1), rng.choice(STEPS), count)


def _instruction(problem: Problem) -> str:
    verb = "add" if problem.step > 0 else "subtract"
    return f"Start at {problem.start} and {verb} {abs(problem.step)} modulo 10, {problem.count} times"


def prompt_text(problem: Problem) -> str:
    return f"{_instruction(problem)}. What is the result?"


def reasoning_text(problem: Problem) -> str:
    """The assistant turn: CoT between the markers, then the answer (paper format after formatting)."""
    lines = [f"{_instruction(problem)}."]
    previous, sign = problem.start, "+" if problem.step > 0 else "-"
    for k, value in enumerate(problem.values, start=1):
        lines.append(f"{k}: {previous}{sign}{abs(problem.step)}={value}")
        previous = value
    lines.append(f"So the result is {problem.answer}.")
    cot = "\n".join(lines)
    return f"<think>\n{cot}\n</think>\n\nThe result is \\boxed{{{problem.answer}}}."


def _digest_byte(problem: Problem) -> int:
    return hashlib.sha256(f"{problem.start},{problem.step},{problem.count}".encode()).digest()[0]


def is_held_out(problem: Problem) -> bool:
    """Whether the problem's (start, step, count) combination belongs to the held-out (test) split."""
    return _digest_byte(problem) < 256 * HELD_OUT_FRACTION


def is_validation(problem: Problem) -> bool:
    """Whether the combination belongs to the validation split (never held out, never KD-trained on)."""
    return 256 * HELD_OUT_FRACTION <= _digest_byte(problem) < 256 * (HELD_OUT_FRACTION + VALIDATION_FRACTION)


def _record(problem: Problem) -> dict:
    return {"problem": prompt_text(problem), "reasoning": reasoning_text(problem),
            "answer": str(problem.answer), "n_steps": problem.count}


def make_split(n: int, seed: int, min_steps: int = 2, max_steps: int = 12, split: str = "train") -> list[dict]:
    """Records in the schema every data source produces: problem, reasoning (CoT + answer), answer.

    ``train``: n problems drawn (with repeats) from the combinations in neither the test nor the
    validation split (KD training). ``prep``: the same from every combination not held out for test
    (how the embedded teacher and base are prepared). ``test``: up to n distinct held-out
    combinations, in a seeded order (about 130 with 2..12 steps). ``val``: likewise, up to n
    distinct validation combinations (about 45)."""
    if split not in ("train", "prep", "val", "test"):
        raise ValueError(f"split={split!r}: must be one of train, prep, val, test")
    rng = random.Random(seed)
    if split in ("test", "val"):
        problems = [Problem(start, step, count) for start, step, count in itertools.product(
            range(MODULUS), STEPS, range(min_steps, max_steps + 1))]
        chosen = [p for p in problems if (is_held_out(p) if split == "test" else is_validation(p))]
        rng.shuffle(chosen)
        return [_record(p) for p in chosen[:n]]
    records = []
    while len(records) < n:
        problem = sample_problem(rng, min_steps, max_steps)
        if not is_held_out(problem) and (split == "prep" or not is_validation(problem)):
            records.append(_record(problem))
    return records


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in a generation, or None."""
    found = BOXED.findall(text)
    return found[-1].strip() if found else None


def corpus_text() -> str:
    """Every word and symbol the task can produce, to build the tokenizer's vocabulary from."""
    rng = random.Random(0)
    texts = [prompt_text(p) + reasoning_text(p) for p in (sample_problem(rng, 12, 12) for _ in range(50))]
    signed = " ".join(f"{op}{d}" for op in "+-" for d in range(10))
    texts.append(f"user assistant system add subtract modulo 0123456789 {signed} +-=:.,?{{}}\\\n")
    return "\n".join(texts)
