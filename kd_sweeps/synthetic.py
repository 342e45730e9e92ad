"""The embedded task: the last digit of ``start + step x count``, worked out one addition at a time,
with a real prompt / chain of thought / answer in the proportions of the paper's data.

A problem is a start digit, a step (1, 3, 7 or 9) and a count (2..12). The prompt is the expression
itself, ``7+9×9`` (4 tokens). The chain of thought restates it on its first line, then works one
line per addition, ``6+9=15, so 5, 7 left``: the sum, its last digit (the running value) and how many
additions remain; the last line (``0 left``) carries the result, and the answer is ``\\boxed{8}``.
So the prompt is under a tenth of a sequence's tokens, the chain of thought over four fifths and the
answer a few tokens, and lengths run from about 60 to 210 tokens (3.5x): a miniature of the long
reasoning traces the paper truncates, where cutting the leading half keeps the prompt and the first
half of the working, not the result.

Every line needs only tokens close to it: the running value ends the line above, the countdown sits
at the end of each line (so when to stop is decided right where it is written), and the sum is a
small table over (digit, step). A two-layer model of a few hundred thousand parameters learns it in
about a minute on two CPU cores; copying a value from far back (a long restatement, a line number
compared with the count in the prompt) is what makes such tasks slow for tiny models.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass

MODULUS = 10  # the running value is the last digit: one-token values
# Steps a problem can use: each line's sum is a table over (digit, step), kept small; steps prime to
# 10, so a chain visits every digit and the answer depends on every line.
STEPS = (1, 3, 7, 9)
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
    step: int  # added at every step
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


def prompt_text(problem: Problem) -> str:
    """The user turn: the expression whose last digit is asked for, e.g. ``7+9×9``."""
    return f"{problem.start}+{problem.step}×{problem.count}"


def reasoning_text(problem: Problem) -> str:
    """The assistant turn: CoT between the markers, then the answer (paper format after formatting).
    The first line restates the problem; each next line is one addition and the countdown."""
    lines = [prompt_text(problem)]
    previous = problem.start
    for k, value in enumerate(problem.values, start=1):
        lines.append(f"{previous}+{problem.step}={previous + problem.step}, so {value}, {problem.count - k} left")
        previous = value
    cot = "\n".join(lines)
    return f"<think>\n{cot}\n</think>\n\n\\boxed{{{problem.answer}}}"


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
    numbers = " ".join(str(n) for n in range(MODULUS + max(STEPS)))  # sums reach 9 + 9
    signed = " ".join(f"+{d}" for d in range(MODULUS))
    texts.append(f"user assistant system left so {numbers} {signed} ×+=,{{}}\\\n")
    return "\n".join(texts)
