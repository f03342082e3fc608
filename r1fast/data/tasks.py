"""Built-in procedurally generated reasoning tasks.

`arithmetic`: a chain of single-digit additions/subtractions, e.g. prompt "7+5-3+8=", with a worked
chain of thought "<think>7+5=12 12-3=9 9+8=17</think><answer>17</answer>". Each row carries the
prompt, the reference answer, and a teacher completion for the cold-start SFT.

Imperfect cold-start data, as R1's is: `teacher_noise` makes the teacher slip (each intermediate
result off by one with that probability, the chain carrying on from the wrong value), and
`answer_noise` makes its final answer disagree with its own chain by one. A model cloned from such
a teacher samples the same slips; GRPO with an accuracy reward is what removes them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithmeticTask:
    min_terms: int = 3
    max_terms: int = 4
    max_operand: int = 9
    teacher_noise: float = 0.0
    answer_noise: float = 0.0

    def __post_init__(self):
        for name in ("min_terms", "max_terms", "max_operand"):   # 4.5 failed later in randrange, unnamed
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
                raise ValueError(f"arithmetic task: {name} must be a whole number; got {v!r}")
            object.__setattr__(self, name, int(v))   # 1e1 from a query string is 10
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"arithmetic task: need 2 <= min_terms <= max_terms; got {self.min_terms}, {self.max_terms}")
        if self.max_operand < 1:
            raise ValueError(f"arithmetic task: max_operand must be >= 1; got {self.max_operand}")
        if not 0.0 <= self.teacher_noise < 1.0:
            raise ValueError(f"arithmetic task: teacher_noise must be in [0, 1); got {self.teacher_noise}")
        if not 0.0 <= self.answer_noise < 1.0:
            raise ValueError(f"arithmetic task: answer_noise must be in [0, 1); got {self.answer_noise}")

    def row(self, rng: random.Random) -> dict:
        return self._row(*self._operands(rng, rng.randint(self.min_terms, self.max_terms)), rng)

    def _operands(self, rng: random.Random, n: int) -> tuple[list[int], list[str]]:
        """The `n` terms of a prompt and the n - 1 signs between them."""
        terms = [rng.randint(1, self.max_operand) for _ in range(n)]
        ops = [rng.choice("+-") for _ in range(n - 1)]
        return terms, ops

    def _row(self, terms: list[int], ops: list[str], rng: random.Random) -> dict:
        """The row of a prompt of these terms and signs: its exact answer, and the teacher's chain (noise from rng)."""
        prompt = _prompt(terms, ops)
        exact = terms[0]
        shown = terms[0]
        steps = []
        for o, t in zip(ops, terms[1:]):
            exact = exact + t if o == "+" else exact - t
            value = shown + t if o == "+" else shown - t
            if rng.random() < self.teacher_noise:
                value += rng.choice((-1, 1))
            steps.append(f"{shown}{o}{t}={value}")
            shown = value
        answer = shown + rng.choice((-1, 1)) if rng.random() < self.answer_noise else shown
        completion = f"<think>{' '.join(steps)}</think><answer>{answer}</answer>"
        return {"prompt": prompt, "answer": str(exact), "completion": completion}

    def rows(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [self.row(rng) for _ in range(n)]

    def prompts_of(self, n_terms: int, cap: int) -> int:
        """How many different prompts have `n_terms` terms (each term one of max_operand, each sign one of two), or
        `cap` if more: max_terms=10**6 is a number of a million digits, not worth computing to compare."""
        if n_terms - 1 >= cap.bit_length():   # the signs alone make more
            return cap
        return min(cap, self.max_operand ** n_terms * 2 ** (n_terms - 1))

    def distinct_rows(self, n: int, seed: int) -> list[dict]:
        """n rows of n different prompts, as a held-out set is: `rows` repeated a few (3 of 128 three-term
        prompts at the default run's seed), which counted twice in its accuracy. Each row's count of terms is
        drawn as `rows` draws it, and a prompt drawn before is drawn again with that count, so the counts (the
        difficulty) are distributed as in `rows`, and the rows are `rows`' own up to its first repeat. Only a
        count whose prompts are all taken is drawn again (a few prompts, many rows asked for). Fewer rows of the
        seed are the first of more (a count holds no more than n's room, and so is not full, in the first n rows)."""
        room = {k: self.prompts_of(k, n) for k in range(self.min_terms, self.max_terms + 1)}   # prompts by count
        if n > sum(room.values()):
            raise ValueError(f"{n} different prompts asked for, but its parameters make only {sum(room.values())}")
        rng = random.Random(seed)
        seen: set[str] = set()
        out = []
        while len(out) < n:
            k = rng.randint(self.min_terms, self.max_terms)
            if room[k] == 0:   # all of its prompts are taken
                continue
            while True:
                terms, ops = self._operands(rng, k)
                prompt = _prompt(terms, ops)
                if prompt not in seen:
                    break
            seen.add(prompt)
            room[k] -= 1
            out.append(self._row(terms, ops, rng))
        return out


def _prompt(terms: list[int], ops: list[str]) -> str:
    return str(terms[0]) + "".join(o + str(t) for o, t in zip(ops, terms[1:])) + "="


TASKS = {"arithmetic": ArithmeticTask}

# The most rows one draw of a built-in task makes: each is a Python dict of a few hundred bytes, and a count
# typed too large (eval_size=1e9) drew rows, silently, until memory ran out. The arithmetic task's default
# parameters have under 60,000 distinct prompts, so a million rows is already mostly repeats.
MAX_BUILTIN_ROWS = 1_000_000


def _number(spec: str, key: str, raw: str) -> int | float:
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)   # 0.1, 1e-1
    except ValueError:
        raise ValueError(f"built-in task {spec!r}: parameter {key!r} must be a number; got {raw!r}") from None


def builtin_rows(spec: str, n: int, seed: int, *, distinct: bool = False, **overrides) -> list[dict]:
    """`builtin:arithmetic` (optionally `builtin:arithmetic?max_terms=5&teacher_noise=0.2`) → rows.
    distinct: n different prompts (a held-out set's), an error naming the task when it has fewer."""
    name = spec.split(":", 1)[1] if spec.startswith("builtin:") else spec
    params: dict = {}
    if "?" in name:
        name, query = name.split("?", 1)
        for part in filter(None, query.split("&")):
            if "=" not in part:
                raise ValueError(f"built-in task {spec!r}: cannot read parameter {part!r} (write key=value)")
            k, v = part.split("=", 1)
            params[k] = _number(spec, k, v)
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(TASKS)}")
    if n > MAX_BUILTIN_ROWS:
        raise ValueError(f"built-in task {spec!r}: {n} rows asked for (a pipeline stage's num_rows, or eval_size for "
                         f"an eval_dataset); a built-in task draws at most {MAX_BUILTIN_ROWS:,}")
    params.update(overrides)
    _check_parameter_names(spec, TASKS[name], params)
    try:
        task = TASKS[name](**params)
    except TypeError as e:
        raise ValueError(f"built-in task {name!r}: {e}") from None
    if not distinct:
        return task.rows(n, seed)
    try:
        return task.distinct_rows(n, seed)
    except ValueError as e:
        raise ValueError(f"built-in task {spec!r} as a held-out set: {e}; lower eval_size, or raise max_terms or "
                         f"max_operand") from None


def _check_parameter_names(spec: str, task_cls, params: dict):
    """A misspelt parameter (max_term) is named with the task's parameters, and the close one, rather than
    as the dataclass constructor's TypeError."""
    import dataclasses
    import difflib

    known = [f.name for f in dataclasses.fields(task_cls)]
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"built-in task {spec!r}: unknown parameter {key!r}; {hint}its parameters: "
                             f"{', '.join(known)}")
