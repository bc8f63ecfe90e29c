"""The demo world: three toy tasks and a mixed-quality data pool, generated from a seed.

Everything is templated text, so it is deterministic, needs no hub and holds exact labels:
- **math**: one-step word problems (add or subtract a number up to 19) with a worked answer in
  GSM8K's form, ``"17 + 5 = 22\\n#### 22"``;
- **translation**: English -> French on a 40-word toy vocabulary with French word order (adjective
  after the noun), scored with chrF;
- **summarization**: three-sentence news items whose first sentence is the summary (ROUGE-L).

The pool mixes every quality a real instruction pool has, each row labelled in a `kind` column the
pipeline never reads (the report uses it to show what each arm kept): correct math, math with wrong
answers (a weak solver's carry/borrow slips by default, or off by 1-5; consistently in the worked
line and after ``####``), truncated math (cut before the answer), near-duplicates of math rows,
task-like rows that are not arithmetic (read a number back, arithmetic in another format),
translation and summarization pairs, number-heavy prose and general chat. A `utility` label
(useful / neutral / harmful) is what the `oracle` arm reads, and `calibrate.py` checks at build
time that the world can test the claim (P1, P2 on the dev set). Dev and test problems never occur
in the pool (no question string is shared).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

NAMES = ("Tom", "Ann", "Ben", "Mia", "Sam", "Lea", "Max", "Eva", "Leo", "Zoe", "Ivy", "Kai")
OBJECTS = ("apple", "pear", "stone", "card", "book", "shell", "coin", "bead", "cake", "kite")
WEATHER = ("sunny", "cloudy", "cool", "bright", "windy")

ADD_TEMPLATES = (
    "{n} has {a} {o}s and buys {b} more. How many {o}s does {n} have now?",
    "{n} picked {a} {o}s in the morning and {b} in the afternoon. How many {o}s did {n} pick in all?",
    "There are {a} {o}s in a box. {n} puts in {b} more. How many {o}s are in the box?",
)
SUB_TEMPLATES = (
    "{n} has {a} {o}s and gives {b} to a friend. How many {o}s does {n} have left?",
    "{n} had {a} {o}s and lost {b} of them. How many {o}s are left?",
    "A shop has {a} {o}s and sells {b}. How many {o}s does the shop have now?",
)

# Toy English -> French: nouns (all masculine), adjectives (placed after the noun), verbs.
NOUNS = {"cat": "chat", "dog": "chien", "bird": "oiseau", "horse": "cheval", "boy": "garçon",
         "man": "homme", "bread": "pain", "book": "livre", "tree": "arbre", "train": "train"}
ADJECTIVES = {"red": "rouge", "black": "noir", "small": "petit", "tall": "grand", "old": "vieux",
              "young": "jeune", "happy": "heureux", "green": "vert", "blue": "bleu", "white": "blanc"}
VERBS = {"sleeps": "dort", "eats": "mange", "runs": "court", "sings": "chante", "waits": "attend",
         "falls": "tombe", "reads": "lit", "plays": "joue", "works": "travaille", "stays": "reste"}

CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Dakar", "Perth", "Lyon")
PLACES = ("library", "bridge", "school", "market", "museum", "park", "station", "hospital", "stadium", "theater")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FILLERS = (
    "Many people came to see it.", "The weather was {w} and mild.", "Local shops stayed open late.",
    "The mayor gave a short speech.", "Children played near the river.", "A band played in the square.",
    "Tickets were free for everyone.", "The work took {k} months.", "Buses ran every {k} minutes.",
    "Visitors took many photos.",
)
ANIMALS = ("cat", "dog", "bird", "horse", "fox", "owl", "bear", "wolf", "frog", "duck")
FACTS = (
    "The {a} lives near the river and likes to sleep in the sun.",
    "A {a} can be very quiet at night.",
    "The old {a} walks slowly through the forest.",
    "In winter the {a} stays close to its home.",
    "Every morning the {a} looks for food in the field.",
)
CHAT_PROMPTS = ("Tell me about the {a}.", "Write a sentence about a {a}.", "Describe the {a} in one line.")


@dataclass(frozen=True)
class MathProblem:
    a: int
    b: int
    op: str  # "+" or "-"
    template: int
    name: str
    obj: str

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        t = (ADD_TEMPLATES if self.op == "+" else SUB_TEMPLATES)[self.template]
        return t.format(n=self.name, a=self.a, b=self.b, o=self.obj)

    def worked(self, answer: int | None = None) -> str:
        c = self.answer if answer is None else answer
        return f"{self.a} {self.op} {self.b} = {c}\n#### {c}"


def slip_answer(p: MathProblem) -> int:
    """The answer a weak solver writes: digits added without carrying, or the smaller digit taken from
    the larger one without borrowing (43 - 19 -> 36), the classic systematic school-arithmetic bugs; a
    problem that needs no carry or borrow gets a tens slip (true answer +- 10) instead."""
    a, b, out, place = p.a, p.b, 0, 1
    while a or b:
        da, db = a % 10, b % 10
        out += ((da + db) % 10 if p.op == "+" else abs(da - db)) * place
        a, b, place = a // 10, b // 10, place * 10
    if out == p.answer:
        out = p.answer + 10 if p.answer < 10 or (p.a + p.b) % 2 else p.answer - 10
    return out


def math_problem(rng: random.Random) -> MathProblem:
    # Sums of up to 49 + 19 and differences from up to 68: hard enough that the tiny base model gets
    # a minority right after pretraining, so fine-tuning data has room to help (or hurt).
    op = rng.choice("+-")
    b = rng.randint(1, 19)
    a = rng.randint(2, 49) if op == "+" else rng.randint(b + 1, 68)
    return MathProblem(a, b, op, rng.randrange(3), rng.choice(NAMES), rng.choice(OBJECTS))


def translation_pair(rng: random.Random) -> tuple[str, str]:
    """('the small dog eats', 'le chien petit mange'); sometimes two clauses joined by 'and'."""
    def clause() -> tuple[str, str]:
        n, a, v = rng.choice(list(NOUNS)), rng.choice(list(ADJECTIVES)), rng.choice(list(VERBS))
        return f"the {a} {n} {v}", f"le {NOUNS[n]} {ADJECTIVES[a]} {VERBS[v]}"

    en, fr = clause()
    if rng.random() < 0.3:
        en2, fr2 = clause()
        en, fr = f"{en} and {en2}", f"{fr} et {fr2}"
    return en, fr


def summary_item(rng: random.Random) -> tuple[str, str]:
    """(three-sentence article, its first sentence)."""
    lead = f"{rng.choice(CITIES)} opened a new {rng.choice(PLACES)} on {rng.choice(DAYS)}."
    rest = [f.format(w=rng.choice(WEATHER), k=rng.randint(2, 12)) for f in rng.sample(FILLERS, 2)]
    return " ".join([lead, *rest]), lead


def number_prose(rng: random.Random) -> str:
    n, o = rng.choice(NAMES), rng.choice(OBJECTS)
    return rng.choice((
        f"{n} keeps {rng.randint(2, 29)} {o}s on the shelf and {rng.randint(1, 9)} in a bag.",
        f"The train leaves at {rng.randint(1, 12)} and room {rng.randint(2, 29)} is on floor {rng.randint(1, 9)}.",
        f"Bus {rng.randint(2, 29)} stops {rng.randint(1, 9)} times before the {rng.choice(PLACES)}.",
    ))


# --------------------------------------------------------------------------------------------
# task sets and the pool


def math_sets(seed: int, n_recall: int, n_dev: int, n_test: int) -> tuple[list[dict], list[dict], list[dict], set[str]]:
    """Disjoint recall/dev/test problems (rows with question/answer) and the questions they use."""
    rng = random.Random(seed * 1009 + 17)
    seen: set[str] = set()
    out: list[list[dict]] = []
    for n in (n_recall, n_dev, n_test):
        rows: list[dict] = []
        while len(rows) < n:
            p = math_problem(rng)
            if p.question in seen:
                continue
            seen.add(p.question)
            rows.append({"id": f"math-{len(seen)}", "question": p.question, "answer": p.worked()})
        out.append(rows)
    return out[0], out[1], out[2], seen


def translation_sets(seed: int, n_recall: int, n_dev: int, n_test: int) -> tuple[list[dict], list[dict], list[dict], set[str]]:
    rng = random.Random(seed * 1013 + 19)
    return _disjoint(lambda: translation_pair(rng), (n_recall, n_dev, n_test), "tr", ("source", "reference"))


def summarization_sets(seed: int, n_recall: int, n_dev: int, n_test: int) -> tuple[list[dict], list[dict], list[dict], set[str]]:
    rng = random.Random(seed * 1019 + 23)
    return _disjoint(lambda: summary_item(rng), (n_recall, n_dev, n_test), "sum", ("article", "summary"))


def _disjoint(draw: Callable[[], tuple[str, str]], sizes: tuple[int, ...], prefix: str,
              columns: tuple[str, str]) -> tuple[list[dict], list[dict], list[dict], set[str]]:
    seen: set[str] = set()
    out: list[list[dict]] = []
    for n in sizes:
        rows: list[dict] = []
        while len(rows) < n:
            src, ref = draw()
            if src in seen:
                continue
            seen.add(src)
            rows.append({"id": f"{prefix}-{len(seen)}", columns[0]: src, columns[1]: ref})
        out.append(rows)
    return out[0], out[1], out[2], seen


# Pool composition (fractions of the pool); the `kind` column holds these names. Fixed, with the
# base model's pretraining mixture, by the world's P1/P2 calibration alone (BENCHMARKS.md).
POOL_MIX: dict[str, float] = {
    "math_correct": 0.37,
    "math_wrong": 0.15,
    "math_truncated": 0.05,
    "math_near_duplicate": 0.05,
    "math_like_lookup": 0.08,  # "How many X does N have?" where the number is read back, no arithmetic
    "math_other_format": 0.05,  # "What is 7 plus 5?" -> "12" (no worked answer, no ####)
    "translation": 0.07,
    "summarization": 0.07,
    "number_prose": 0.06,
    "chat": 0.05,
}
OFF_TASK = ("translation", "summarization", "number_prose", "chat")
# What a row is worth to a math fine-tune (the `utility` column; the oracle arm ranks by it):
# 2 useful (a correct worked answer), 1 neutral (teaches no math, or repeats a correct row),
# 0 harmful (a wrong or cut-off answer in the task's own format).
USEFUL, NEUTRAL, HARMFUL = 2, 1, 0
# Which defects a feature of the base model could plausibly see, and where (issue 10, P3):
VISIBILITY: dict[str, str] = {
    "math_wrong": "invisible: same prompt and form as a correct row; only the arithmetic differs "
                  "(measured: no SAE latent separates them, BENCHMARKS.md)",
    "math_truncated": "visible in the response (no '####' line), not in the prompt",
    "math_near_duplicate": "invisible to a per-row score (a duplicate is only a duplicate of another row)",
    "math_like_lookup": "look-alike, visible in the prompt in principle (no second quantity is added or taken)",
    "math_other_format": "look-alike, visible in the prompt ('What is 7 plus 5?', not a word problem)",
    "translation": "off-task, visible in the prompt", "summarization": "off-task, visible in the prompt",
    "number_prose": "off-task, visible in the prompt", "chat": "off-task, visible in the prompt",
}


def utility(kind: str, correct: bool | None) -> int:
    if kind == "math_correct":
        return USEFUL
    if kind in ("math_wrong", "math_truncated") or (kind == "math_near_duplicate" and correct is False):
        return HARMFUL
    return NEUTRAL


ON_TASK_CLEAN = "math_correct"


def pool_rows(seed: int, n: int, math_prompt: Callable[[str], str], translation_prompt: Callable[[str], str],
              summarization_prompt: Callable[[str], str], held_out: set[str],
              wrong_answers: str = "slip", wrong_share: float | None = None,
              truncated_share: float | None = None) -> list[dict]:
    """`n` pool rows (prompt, response, kind) in a seeded shuffled order; no held-out source appears.

    `wrong_answers`: how the `math_wrong` rows are wrong: `slip` (a weak solver's systematic carry and
    borrow bugs, `slip_answer`) or `offset` (the true answer off by 1-5 either way, mean-zero noise).
    `wrong_share`, `truncated_share`: the pool's share of `math_wrong` / `math_truncated` rows (None:
    POOL_MIX's); the difference is taken from (or given to) the off-task kinds in proportion, so the
    correct worked math and the look-alikes stay as they are and only the amount of harm changes."""
    if wrong_answers not in ("slip", "offset", "operation"):
        raise ValueError(f"wrong_answers must be slip, offset or operation, got {wrong_answers!r}")
    mix = dict(POOL_MIX)
    shares = {k: v for k, v in (("math_wrong", wrong_share), ("math_truncated", truncated_share)) if v is not None}
    if shares:
        room = sum(mix[k] for k in OFF_TASK) + sum(mix[k] for k in shares)
        if any(v < 0 for v in shares.values()) or sum(shares.values()) >= room:
            raise ValueError(f"wrong_share + truncated_share must be in [0, {room:.2f}) (their default shares + "
                             f"the off-task ones), got {shares}")
        scale = (room - sum(shares.values())) / (room - sum(mix[k] for k in shares))
        mix.update({k: mix[k] * scale for k in OFF_TASK}, **shares)
    rng = random.Random(seed * 1031 + 29)
    counts = {k: int(round(f * n)) for k, f in mix.items()}
    counts["math_correct"] += n - sum(counts.values())
    rows: list[dict] = []
    math_rows: list[tuple[MathProblem, str, bool]] = []  # (problem, response, correct): near-duplicates copy one

    def fresh(draw: Callable[[], Any], source: Callable[[Any], str]) -> Any:
        """The next draw whose source text is not a held-out dev/test/recall source."""
        while True:
            item = draw()
            if source(item) not in held_out:
                return item

    def fresh_math() -> MathProblem:
        return fresh(lambda: math_problem(rng), lambda p: p.question)

    for _ in range(counts["math_correct"]):
        p = fresh_math()
        math_rows.append((p, p.worked(), True))
        rows.append({"prompt": math_prompt(p.question), "response": p.worked(), "kind": "math_correct", "correct": True})
    for _ in range(counts["math_wrong"]):
        p = fresh_math()
        delta = rng.randint(1, 5)
        wrong = p.answer - delta if rng.random() < 0.5 and p.answer - delta >= 0 else p.answer + delta
        if wrong_answers == "slip":  # the draw above still runs, so every style keeps the same problems
            wrong = slip_answer(p)
        response = p.worked(wrong)
        if wrong_answers == "operation":  # the other operation, worked out right: "43 + 19" -> "43 - 19 = 24"
            wp = dataclasses.replace(p, op="-" if p.op == "+" else "+")
            wp = dataclasses.replace(wp, a=p.b, b=p.a) if wp.op == "-" and wp.a < wp.b else wp
            response = wp.worked()
        math_rows.append((p, response, False))
        rows.append({"prompt": math_prompt(p.question), "response": response, "kind": "math_wrong", "correct": False})
    for _ in range(counts["math_truncated"]):
        p = fresh_math()
        rows.append({"prompt": math_prompt(p.question), "response": f"{p.a} {p.op} {p.b} =", "kind": "math_truncated"})
    for _ in range(counts["math_near_duplicate"]):
        p, response, ok = rng.choice(math_rows)
        q = p.question.replace(" How", "  How") if rng.random() < 0.5 else p.question.rstrip("?") + " ?"
        rows.append({"prompt": math_prompt(q), "response": response, "kind": "math_near_duplicate", "correct": ok})
    for _ in range(counts["math_like_lookup"]):
        n_, o1, o2 = rng.choice(NAMES), *rng.sample(OBJECTS, 2)
        a, b = rng.randint(2, 29), rng.randint(1, 9)
        q = f"{n_} has {a} {o1}s and {b} {o2}s. How many {o1}s does {n_} have?"
        rows.append({"prompt": math_prompt(q), "response": f"{n_} has {a} {o1}s.\n#### {a}", "kind": "math_like_lookup"})
    for _ in range(counts["math_other_format"]):
        p = fresh_math()
        word = "plus" if p.op == "+" else "minus"
        rows.append({"prompt": f"What is {p.a} {word} {p.b}?\n", "response": str(p.answer), "kind": "math_other_format"})
    for _ in range(counts["translation"]):
        en, fr = fresh(lambda: translation_pair(rng), lambda pair: pair[0])
        rows.append({"prompt": translation_prompt(en), "response": fr, "kind": "translation"})
    for _ in range(counts["summarization"]):
        art, lead = fresh(lambda: summary_item(rng), lambda item: item[0])
        rows.append({"prompt": summarization_prompt(art), "response": lead, "kind": "summarization"})
    for _ in range(counts["number_prose"]):
        rows.append({"prompt": "Write a sentence with numbers.\n", "response": number_prose(rng), "kind": "number_prose"})
    for _ in range(counts["chat"]):
        a = rng.choice(ANIMALS)
        rows.append({"prompt": rng.choice(CHAT_PROMPTS).format(a=a) + "\n",
                     "response": rng.choice(FACTS).format(a=a), "kind": "chat"})
    rng.shuffle(rows)
    for i, r in enumerate(rows):
        r["id"] = f"pool-{i:06d}"
        r.setdefault("correct", None)
        r["utility"] = utility(r["kind"], r["correct"])
    return rows


def pretraining_documents(seed: int, math_prompt: Callable[[str], str], translation_prompt: Callable[[str], str],
                          summarization_prompt: Callable[[str], str], held_out: set[str],
                          math_share: float = 0.3, arith_share: float | None = None) -> Iterator[str]:
    """An endless seeded stream of documents for the base model: a general mixture in which worked
    math is `math_share` of the documents (correct answers only), bare arithmetic facts
    ("17 + 5 = 22") `arith_share` (default: an equal share of the rest), and the rest translation,
    summaries, number prose and chat. Held-out dev/test sources never appear."""
    rng = random.Random(seed * 1049 + 31)
    other = (1.0 - math_share) / 5
    arith = other if arith_share is None else arith_share
    other = (1.0 - math_share - arith) / 4
    while True:
        r = rng.random()
        if r < math_share:
            p = math_problem(rng)
            if p.question in held_out:
                continue
            yield math_prompt(p.question) + p.worked()
        elif r < math_share + arith:
            p = math_problem(rng)
            yield f"{p.a} {p.op} {p.b} = {p.answer}"
        elif r < math_share + arith + other:
            en, fr = translation_pair(rng)
            if en not in held_out:
                yield translation_prompt(en) + fr
        elif r < math_share + arith + 2 * other:
            art, lead = summary_item(rng)
            if art not in held_out:
                yield summarization_prompt(art) + lead
        elif r < math_share + arith + 3 * other:
            yield number_prose(rng)
        else:
            a = rng.choice(ANIMALS)
            yield rng.choice(CHAT_PROMPTS).format(a=a) + "\n" + rng.choice(FACTS).format(a=a)


# --------------------------------------------------------------------------------------------
# building the world on disk

WORLD_JSON = "world.json"


def spec_key(spec: Any) -> str:
    """A world spec's name: the hash of its fields (a dataclass); the same key means a reusable build."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:12]


TASKS = ("math", "translation", "summarization")


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines the world; its hash names a reusable build."""

    seed: int = 0
    # 1,000 rows, fine-tuned in batches of 16: the same optimizer steps per arm as the earlier 2,000 rows in
    # batches of 32, at half the tokens (a step's cost is linear in the batch: 39 against 77 ms on one core).
    # Chosen for `make demo`'s 10 minutes and checked by P1/P2 alone (BENCHMARKS.md, "A cheaper world").
    pool_rows: int = 1000
    pool_files: int = 4
    n_recall: int = 200
    n_dev: int = 500
    n_test: int = 300
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 2
    intermediate_size: int = 256
    pretrain_steps: int = 1600
    pretrain_batch: int = 48
    pretrain_seq_len: int = 64
    pretrain_lr: float = 3e-3
    # The base model computes ("43 + 19 = 62": 99% right on bare sums after pretraining) and has seen
    # worked word problems only in another prompt template, without learning to solve them (2% in that
    # template, 0.6% in the pool's). Fine-tuning then teaches the mapping from the pool's word problems
    # to worked answers (it appears abruptly, after a seed-dependent number of steps), and the pool's
    # wrong answers teach wrong arithmetic: at 20 epochs full 70% / 74% against the oracle half's 97% /
    # 98% on world seeds 0 / 1 (dev, 3 fine-tuning seeds each). These values (math_share,
    # pretrain_math_template, arith_share, pretrain_steps, wrong_answers, ft_epochs) were fixed by the
    # P1/P2 check on the dev set alone (BENCHMARKS.md, "World calibration"), before any IGDS arm ran
    # in a world built with them.
    math_share: float = 0.05
    # The math template of pretraining's worked problems (MATH_TEMPLATES; the pool and evaluation use 1).
    pretrain_math_template: int = 2
    arith_share: float | None = 0.6  # bare "a + b = c" documents; None: an equal share of the non-math rest
    wrong_answers: str = "slip"  # how math_wrong rows are wrong: slip (carry/borrow bugs), offset or operation
    wrong_share: float | None = None  # share of math_wrong rows in the pool (None: POOL_MIX's 0.15)
    truncated_share: float | None = None  # share of math_truncated rows (None: POOL_MIX's 0.05)
    layer: int = 2
    d_sae: int = 512
    sae_architecture: str = "batchtopk"  # sae-lens saves it as JumpReLU: sliceable by the k-feature encoder
    sae_k: int = 8
    sae_tokens: int = 500_000
    sae_lr: float = 1e-3
    # Fine-tuning, shared by the world's P1/P2 check and the demo pipeline's arms.
    # 20: at 10 the oracle half's 310 steps missed the mapping on one seed of world seed 1 (36%)
    ft_epochs: int = 20
    ft_lr: float = 1e-3
    ft_batch: int = 16
    ft_max_tokens: int = 128
    calibrate: bool = True  # measure P1/P2 on the dev set at build time (in-process fine-tunes)
    # fine-tuning seeds per arm in that check: one fine-tune's accuracy moves ~5 points with rounding alone, so
    # one is not enough; 2 (was 3) keeps the paired lower bound and saves a third of the check's time
    calib_seeds: int = 2
    # torch threads for the whole build: a fixed count, so reductions do not vary with the machine's cores.
    # 2: pretraining's steps take 59 against 89 ms on one thread (2-core AMD EPYC). Same machine: bit-identical
    # rebuilds (measured); across CPU models kernels may still differ, so results stand as spreads over seeds.
    threads: int = 2

    @classmethod
    def quick(cls, seed: int = 0) -> "WorldSpec":
        # A contract check (every stage, every file), not a test of selection: it fails P1/P2 (BENCHMARKS.md).
        # 3 fine-tuning epochs, one check seed and 2 torch threads (a fixed count too) keep `ray job submit`
        # of it within CI's time.
        return cls(seed=seed, pool_rows=800, pool_files=2, n_recall=100, n_dev=200, n_test=150,
                   pretrain_steps=500, sae_tokens=200_000, ft_epochs=3, ft_batch=32, calib_seeds=1, threads=2)

    def key(self) -> str:
        return spec_key(self)


@dataclass(frozen=True)
class DemoWorld:
    root: Path
    spec: WorldSpec
    model_dir: Path
    sae_dir: Path
    pool_dir: Path
    stats: dict

    def task_file(self, task: str, split: str) -> Path:
        return self.root / "tasks" / task / f"{split}.parquet"


def prompt_formats() -> tuple[Callable[[str], str], Callable[[str], str], Callable[[str], str]]:
    """How each task's prompt is written in the pool and in pretraining: the tasks' template 1
    ("Question: ...\\nAnswer:\\n"; "English: ...\\nFrench:\\n"; "...\\n\\nTL;DR:\\n"), the templates
    the demo evaluates with, so fine-tuning data and evaluation prompts agree."""
    from igds_ray.tasks.math import MATH_TEMPLATES
    from igds_ray.tasks.summarization import SUMMARIZATION_TEMPLATES
    from igds_ray.tasks.translation import TRANSLATION_TEMPLATES

    return (lambda q: MATH_TEMPLATES[1].format(source=q),
            lambda s: TRANSLATION_TEMPLATES[1].format(src_lang="English", tgt_lang="French", source=s),
            lambda s: SUMMARIZATION_TEMPLATES[1].format(source=s))


def pretraining_math_prompt(spec: WorldSpec) -> Callable[[str], str]:
    """How pretraining writes a math problem's prompt: `spec.pretrain_math_template` of the math task."""
    from igds_ray.tasks.math import MATH_TEMPLATES

    if not 0 <= spec.pretrain_math_template < len(MATH_TEMPLATES):
        raise ValueError(f"pretrain_math_template must be 0..{len(MATH_TEMPLATES) - 1}, "
                         f"got {spec.pretrain_math_template}")
    return lambda q: MATH_TEMPLATES[spec.pretrain_math_template].format(source=q)


def math_accuracy(model: Any, tok: Any, rows: list[dict], max_new_tokens: int = 16, batch: int = 128) -> float:
    """Greedy exact-match accuracy on math rows (question/answer), scored by the math task."""
    import torch

    from igds_ray.tasks.math import MathTask

    task = MathTask()
    fmt = prompt_formats()[0]
    tok.padding_side = "left"
    correct = 0
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        enc = tok([fmt(r["question"]) for r in part], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for t, r in zip(texts, part):
            ans = task.extract(t)
            correct += ans is not None and ans == task.extract(r["answer"])
    return correct / max(1, len(rows))


def bare_arithmetic_accuracy(model: Any, tok: Any, seed: int, n: int = 500, batch: int = 125) -> dict[str, float]:
    """Greedy accuracy on bare expressions of the task's sums and differences ("43 + 19 =" -> "62"):
    whether the base computes, apart from reading word problems. The task has ~2,200 distinct
    expressions, so this measures the facts the model holds, not arithmetic beyond them."""
    import torch

    rng = random.Random(seed * 7919 + 5)
    problems = [math_problem(rng) for _ in range(n)]
    tok.padding_side = "left"
    right = carry_right = carries = 0
    for i in range(0, n, batch):
        part = problems[i:i + batch]
        enc = tok([f"{p.a} {p.op} {p.b} =" for p in part], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        for p, o in zip(part, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            words = o.split()
            ok = bool(words) and words[0] == str(p.answer)
            carry = (p.a % 10 + p.b % 10 >= 10) if p.op == "+" else (p.a % 10 < p.b % 10)
            right += ok
            carries += carry
            carry_right += ok and carry
    return {"n": n, "accuracy": round(right / n, 4), "with_carry_or_borrow": round(carry_right / max(1, carries), 4)}


def cached_world(root: Path, spec: Any, progress: bool = True) -> dict | None:
    """The stats of the world already built under `root` with this spec's key, or None (build it).

    A directory that holds something else than a demo world is refused, never overwritten."""
    import json

    meta = root / WORLD_JSON
    if meta.exists():
        info = json.loads(meta.read_text())
        if info.get("key") == spec.key():
            return info["stats"]
        if progress:
            print(f"[world] {root} holds another world (key {info.get('key')}); rebuilding", flush=True)
    if root.exists() and any(root.iterdir()) and not meta.exists():
        raise FileExistsError(f"{root} exists, is not empty and is not a demo world: choose another --run-dir")
    return None


@contextlib.contextmanager
def staging(root: Path, spec: Any, stats: dict) -> Iterator[Path]:
    """A temporary sibling of `root` to build in, with torch's thread count fixed to `spec.threads`. On success
    `world.json` (key, spec, `stats`) is written and the directory renamed into place; on any error it is removed,
    so an interrupted build leaves nothing a rerun would trust."""
    import json
    import shutil
    import uuid
    from dataclasses import asdict

    import torch

    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        yield tmp
        (tmp / WORLD_JSON).write_text(json.dumps({"key": spec.key(), "spec": asdict(spec), "stats": stats},
                                                 indent=2, default=str))
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)


def write_tasks_and_pool(out: Path, spec: Any, stats: dict) -> tuple[list[dict], list[dict], set[str]]:
    """The three tasks' recall/dev/test sets (`out/tasks/<task>/<split>.parquet`) and the pool (`out/pool`), from
    `spec`'s seed, sizes and defect settings. Returns (pool rows, math dev rows, every held-out source)."""
    import pandas as pd

    from igds_ray.demo.tiny import write_pool

    mp, tp, sp = prompt_formats()
    m_rec, m_dev, m_test, m_held = math_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)
    t_rec, t_dev, t_test, t_held = translation_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)
    s_rec, s_dev, s_test, s_held = summarization_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)
    held = m_held | t_held | s_held
    for task, sets in (("math", (m_rec, m_dev, m_test)), ("translation", (t_rec, t_dev, t_test)),
                       ("summarization", (s_rec, s_dev, s_test))):
        (out / "tasks" / task).mkdir(parents=True)
        for split, rows in zip(("recall", "dev", "test"), sets):
            pd.DataFrame(rows).to_parquet(out / "tasks" / task / f"{split}.parquet", index=False)
    rows = pool_rows(spec.seed, spec.pool_rows, mp, tp, sp, held, spec.wrong_answers, spec.wrong_share,
                     spec.truncated_share)
    write_pool(out / "pool", [{"id": r["id"], "prompt": r["prompt"], "response": r["response"], "kind": r["kind"],
                               "correct": r["correct"], "utility": r["utility"]} for r in rows],
               n_files=spec.pool_files)
    stats["pool_kinds"] = pd.Series([r["kind"] for r in rows]).value_counts().to_dict()
    return rows, m_dev, held


def build_world(root: str | Path, spec: WorldSpec = WorldSpec(), progress: bool = True) -> DemoWorld:
    """Build (or reuse, when `root/world.json` holds the same spec) the demo world under `root`.

    Writes into a temporary sibling directory and renames it into place when complete, so an
    interrupted build leaves nothing a rerun would trust.
    """
    import itertools
    import time

    import torch

    from igds_ray.demo.pretrain import pretrain, save
    from igds_ray.demo.sae_train import train_sae
    from igds_ray.demo.tiny import build_llama, build_tokenizer

    root = Path(root).resolve()
    cached = cached_world(root, spec, progress)
    if cached is not None:
        return world_at(root, spec, cached)
    stats: dict[str, Any] = {}
    with staging(root, spec, stats) as tmp:
        t0 = time.perf_counter()
        _, tp, sp = prompt_formats()
        rows, m_dev, held = write_tasks_and_pool(tmp, spec, stats)

        torch.manual_seed(spec.seed)
        pre_mp = pretraining_math_prompt(spec)
        docs = pretraining_documents(spec.seed, pre_mp, tp, sp, held, spec.math_share, spec.arith_share)
        tok = build_tokenizer(list(itertools.islice(docs, 3000)), vocab_size=spec.vocab_size)
        heads = spec.num_heads
        model = build_llama(len(tok), hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=heads,
                            num_kv_heads=heads, intermediate_size=spec.intermediate_size, seed=spec.seed,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
        stats["params"] = sum(p.numel() for p in model.parameters())
        stats["pretrain"] = pretrain(model, tok, docs, spec.pretrain_steps, spec.pretrain_batch, spec.pretrain_seq_len,
                                     spec.pretrain_lr, seed=spec.seed, progress=progress)
        model_dir = save(model, tok, tmp / "model")
        stats["base_dev_accuracy"] = round(math_accuracy(model, tok, m_dev), 4)
        stats["base_bare_arithmetic"] = bare_arithmetic_accuracy(model, tok, spec.seed)
        if progress:
            print(f"[world] base model: {stats['params']:,} parameters, dev accuracy {stats['base_dev_accuracy']:.1%}, "
                  f"bare sums {stats['base_bare_arithmetic']['accuracy']:.1%}", flush=True)
        sae_texts = list(itertools.islice(
            pretraining_documents(spec.seed + 7, pre_mp, tp, sp, held, spec.math_share, spec.arith_share),
            spec.sae_tokens // 20))
        stats["sae"] = sae_stats = train_sae(model_dir, sae_texts, spec.layer, tmp / "sae", d_sae=spec.d_sae,
                                 architecture=spec.sae_architecture, k=spec.sae_k,
                                 training_tokens=spec.sae_tokens, lr=spec.sae_lr, seed=spec.seed, progress=progress)
        sae_stats.pop("out_dir", None)  # the temporary build path; the SAE ends up in <root>/sae
        if spec.calibrate:
            from igds_ray.demo.calibrate import measure

            stats["calibration"] = measure(model_dir, rows, m_dev, stats["base_dev_accuracy"], spec.ft_epochs,
                                           spec.ft_lr, spec.ft_batch, spec.ft_max_tokens,
                                           range(spec.calib_seeds), progress, threads=spec.threads)
            c = stats["calibration"]
            if progress:
                print(f"[world] P1 (full - base >= {c['p1_min']:.0%} on dev): {c['p1_full_minus_base']:+.1%} "
                      f"{'holds' if c['p1'] else 'FAILS'}; P2 (oracle - full >= {c['p2_min']:.0%}): "
                      f"{c['p2_oracle_minus_full']:+.1%} {'holds' if c['p2'] else 'FAILS'} "
                      f"(means over {len(c['seeds'])} fine-tuning seeds)", flush=True)
        stats["build_s"] = round(time.perf_counter() - t0, 1)
    return world_at(root, spec, stats)


def world_at(root: Path, spec: Any, stats: dict) -> DemoWorld:
    """The built world under `root`: its model, SAE and pool directories."""
    return DemoWorld(root, spec, root / "model", root / "sae", root / "pool", stats)


OFF_TASK_KINDS = ("translation", "summarization", "number_prose", "chat")


def new_pool_file(world_dir: str | Path, pool_dir: str | Path, name: str, n: int, seed: int,
                  off_task: bool = False) -> int:
    """Add one Parquet file of `n` new pool rows to `pool_dir` (a growing pool, issue 14): the world's own pool
    generator with another seed, so the rows look like the pool's (fresh ids `<stem>-<draw>-<id>`, no held-out task
    example); `off_task`: only rows of the other tasks and prose (new files from another task). Written beside
    the pool and moved in whole. Returns the rows written."""
    import json
    import shutil

    from igds_ray.demo.tiny import write_pool

    world_dir, pool_dir = Path(world_dir), Path(pool_dir)
    spec = WorldSpec(**json.loads((world_dir / "world.json").read_text())["spec"])
    mp, tp, sp = prompt_formats()
    held = (math_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)[3]
            | translation_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)[3]
            | summarization_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)[3])
    rows: list[dict] = []
    draw, stem = 0, Path(name).stem
    while len(rows) < n:
        batch = pool_rows(seed + 7919 * draw, n if not off_task else 4 * n, mp, tp, sp, held, spec.wrong_answers,
                          spec.wrong_share, spec.truncated_share)
        rows += [{**r, "id": f"{stem}-{draw}-{r['id']}"} for r in batch
                 if not off_task or r["kind"] in OFF_TASK_KINDS]
        draw += 1
    tmp = pool_dir.parent / f".new-{stem}"
    write_pool(tmp, [{"id": x["id"], "prompt": x["prompt"], "response": x["response"], "kind": x["kind"],
                      "correct": x["correct"], "utility": x["utility"]} for x in rows[:n]], n_files=1)
    shutil.move(str(tmp / "part-000.parquet"), str(pool_dir / name))
    shutil.rmtree(tmp)
    return n
