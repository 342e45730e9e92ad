"""The embedded task: multi-step arithmetic with a real prompt / chain of thought / answer structure.

A problem is a start value and 2..12 labelled steps (``a+5 b-3 c+8``). The chain of thought restates
the start, then each step followed by its arithmetic on the running value (``b-3: 7-3=4``), one per
line, then states the result; the answer repeats it in ``\\boxed{}``. Restating each labelled step
turns "find the k-th operand" into copying what follows the label in the prompt (an induction
pattern), which is what lets a sub-million-parameter model learn long chains on a CPU in minutes. Lengths vary about 3x between 2 and 12 steps, so
truncation cuts different sections of different examples, as it does on real reasoning traces.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

STEP_LABELS = "abcdefghijkl"  # one letter per step: 12 steps at most
MAX_VALUE = 9  # running values stay in [0, 9]: one-digit arithmetic, learnable by a tiny model in minutes
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Problem:
    start: int
    steps: tuple[tuple[str, int], ...]  # (operator, operand) with operator "+" or "-"
    order: tuple[int, ...] = ()  # the order the prompt lists the steps in (empty = a, b, c, ...)

    @property
    def values(self) -> list[int]:
        """Running value after each step (len == len(steps))."""
        out, acc = [], self.start
        for op, n in self.steps:
            acc = acc + n if op == "+" else acc - n
            out.append(acc)
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]


def sample_problem(rng: random.Random, min_steps: int, max_steps: int) -> Problem:
    """Draw one problem; each step is chosen among those that keep the value in [0, MAX_VALUE]."""
    n_steps = rng.randint(min_steps, max_steps)
    acc = start = rng.randint(0, MAX_VALUE)
    steps = []
    for _ in range(n_steps):
        ops = [op for op, room in (("+", MAX_VALUE - acc), ("-", acc)) if room > 0]
        op = rng.choice(ops)
        n = rng.randint(1, MAX_VALUE - acc if op == "+" else acc)
        acc = acc + n if op == "+" else acc - n
        steps.append((op, n))
    return Problem(start, tuple(steps))


def prompt_text(problem: Problem) -> str:
    order = problem.order or range(len(problem.steps))
    ops = " ".join(f"{STEP_LABELS[i]}{problem.steps[i][0]}{problem.steps[i][1]}" for i in order)
    return f"Start at {problem.start} and apply {ops}. What is the result?"


def reasoning_text(problem: Problem) -> str:
    """The assistant turn: CoT between the markers, then the answer (paper format after formatting)."""
    lines = [f"Start at {problem.start}."]
    acc = problem.start
    for i, ((op, n), new) in enumerate(zip(problem.steps, problem.values)):
        lines.append(f"{STEP_LABELS[i]}{op}{n}: {acc}{op}{n}={new}")
        acc = new
    lines.append(f"So the result is {problem.answer}.")
    cot = "\n".join(lines)
    return f"<think>\n{cot}\n</think>\n\nThe result is \\boxed{{{problem.answer}}}."


def make_split(n: int, seed: int, min_steps: int = 2, max_steps: int = 12) -> list[dict]:
    """Records in the schema every data source produces: problem, reasoning (CoT + answer), answer."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        problem = sample_problem(rng, min_steps, max_steps)
        records.append(
            {
                "problem": prompt_text(problem),
                "reasoning": reasoning_text(problem),
                "answer": str(problem.answer),
                "n_steps": len(problem.steps),
            }
        )
    return records


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in a generation, or None."""
    found = BOXED.findall(text)
    return found[-1].strip() if found else None


def corpus_text() -> str:
    """Every word and symbol the task can produce, to build the tokenizer's vocabulary from."""
    rng = random.Random(0)
    texts = [prompt_text(sample_problem(rng, 12, 12)) + reasoning_text(sample_problem(rng, 12, 12))
             for _ in range(50)]
    signed = " ".join(f"{op}{d}" for op in "+-" for d in range(10))
    texts.append(f"user assistant system 0123456789 {signed} {STEP_LABELS} +-=:.,?{{}}\\\n")
    return "\n".join(texts)
