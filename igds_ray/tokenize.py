"""Turn pool rows into model inputs and the positions whose activations are pooled, and write raw
pool prompts in the task template recall measured (`PromptRenderer`, `pool.prompt_template`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence, TypeVar

from igds_ray.errors import ConfigError

if TYPE_CHECKING:
    from igds_ray.config import ScoreConfig

Pooling = Literal["last", "max", "mean", "prompt_max", "prompt_mean"]
POOLINGS: tuple[str, ...] = ("last", "max", "mean", "prompt_max", "prompt_mean")
# Poolings that read the prompt only (the model is causal, so only the prompt is run).
PROMPT_POOLINGS = ("last", "prompt_max", "prompt_mean")
T = TypeVar("T")

# Characters kept before tokenizing: bounds the cost of a pathological multi-megabyte text.
CHARS_PER_TOKEN_CAP = 32


def pools_first_token(tokenizer: Any) -> bool:
    """Whether a sequence's first token may be pooled: only when the tokenizer puts a special token (BOS) there.

    A tokenizer that adds none (SmolLM2, Qwen) leaves the first real token at position 0, where the model keeps
    its attention sink: a residual stream whose norm is two orders of magnitude above the others (SmolLM2-135M,
    block 15: 24,000 against a median of 170, measured), which an SAE trained on BOS-prefixed windows has never
    seen. Pooled there, one latent's value depends only on the first word (a 420-of-600-row tie in the SmolLM2
    demo, BENCHMARKS.md). So that position is never pooled, like BOS."""
    ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return bool(ids) and int(ids[0]) in {int(i) for i in tokenizer.all_special_ids}


def pooled_mask(input_ids: Any, attention_mask: Any, tokenizer: Any) -> Any:
    """[batch, T] bool tensor: the positions of a padded batch that are ever pooled (`ExampleBuilder`'s rule): not
    padding, not a special token, and not the first real token where the tokenizer adds no BOS. Either padding side."""
    import torch

    special = torch.tensor(sorted({int(i) for i in tokenizer.all_special_ids}), dtype=torch.long)
    keep = attention_mask.bool() & ~torch.isin(input_ids, special.to(input_ids.device))
    if not pools_first_token(tokenizer):
        keep &= attention_mask.cumsum(-1) != 1
    return keep


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    positions: list[int]  # positions pooled (one for `last`)
    truncated: bool


class ExampleBuilder:
    """Tokenizes rows the same way for scoring, recall and baselines.

    - `text` rows: BOS + text; `last` reads the last token, max/mean all tokens.
    - prompt + response rows: BOS + prompt (optionally in the chat template) + response, the two
      tokenized separately so the boundary is exact. `last` reads the last prompt token and
      `prompt_max`/`prompt_mean` every prompt token (what recall's `positions: all` reads); since the
      model is causal, only the prompt is run for these. max/mean read the response tokens.
    Special tokens (BOS, template markers, padding) are never pooled, nor position 0 when the tokenizer adds no
    BOS (`pools_first_token`: the attention sink). Over `max_tokens`, `last`
    keeps the first token and the end of the prompt (so the token read is still the prompt's last);
    max/mean keep the start. Either way `truncated` is set.
    """

    def __init__(self, tokenizer: Any, pooling: Pooling, max_tokens: int, chat_template: bool = False) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.tok = tokenizer
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.chat_template = chat_template
        self.special = frozenset(int(i) for i in tokenizer.all_special_ids)
        self.first = 0 if pools_first_token(tokenizer) else 1  # the first position that may be pooled
        self.char_cap = max_tokens * CHARS_PER_TOKEN_CAP

    def _nothing(self, what: str, ids: Sequence[int]) -> str:
        if self.first and any(t not in self.special for t in ids[:1]):
            return (f"{what} has one token, at position 0, where the model keeps its attention sink (the tokenizer "
                    "adds no BOS): nothing to score")
        return f"{what} has no tokens to score (empty or whitespace only)"

    def _cap(self, texts: Sequence[str]) -> tuple[list[str], list[bool]]:
        return [t[: self.char_cap] for t in texts], [len(t) > self.char_cap for t in texts]

    def _encode(self, texts: Sequence[str], add_special_tokens: bool) -> tuple[list[list[int]], list[bool]]:
        capped, cut = self._cap(texts)
        if not capped:
            return [], []
        ids = self.tok(capped, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
        return ids, cut

    def _prompt_texts(self, prompts: Sequence[str]) -> list[str]:
        if not self.chat_template:
            return list(prompts)
        return [
            self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]

    def prompt_ids(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """(token ids, cut by the character cap) per prompt: BOS + prompt, or the prompt in the chat
        template (whose own markers stand in for BOS), untruncated."""
        return self._encode(self._prompt_texts(prompts), add_special_tokens=not self.chat_template)

    def response_ids(self, responses: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """(token ids, cut by the character cap) per response, without special tokens: they follow
        the prompt's ids directly, so the prompt/response boundary is exact."""
        return self._encode(responses, add_special_tokens=False)

    def build_text(self, texts: Sequence[str]) -> list[Example | str]:
        out: list[Example | str] = []
        ids_list, cut = self._encode(texts, add_special_tokens=True)
        for ids, was_cut in zip(ids_list, cut):
            truncated = was_cut or len(ids) > self.max_tokens
            ids = ids[: self.max_tokens]
            pos = [i for i, t in enumerate(ids) if t not in self.special and i >= self.first]
            if not pos:
                out.append(self._nothing("text", ids) if not was_cut else "text has no tokens to score")
                continue
            out.append(Example(ids, pos[-1:] if self.pooling == "last" else pos, truncated))
        return out

    def build_pairs(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Example | str]:
        out: list[Example | str] = []
        p_ids, p_cut = self.prompt_ids(prompts)
        if self.pooling in PROMPT_POOLINGS:
            for ids, was_cut in zip(p_ids, p_cut):
                truncated = was_cut or len(ids) > self.max_tokens
                if len(ids) > self.max_tokens:
                    keep = self.max_tokens - 1
                    ids = ids[:1] + ids[len(ids) - keep :] if keep > 0 else ids[-1:]
                pos = [i for i, t in enumerate(ids) if t not in self.special and i >= self.first]
                if not pos:
                    out.append(self._nothing("prompt", ids))
                    continue
                out.append(Example(ids, pos[-1:] if self.pooling == "last" else pos, truncated))
            return out
        r_ids, r_cut = self.response_ids(responses)
        for pi, rcut, pcut, ri in zip(p_ids, r_cut, p_cut, r_ids):
            ids = pi + ri
            truncated = pcut or rcut or len(ids) > self.max_tokens
            ids = ids[: self.max_tokens]
            pos = [i for i in range(max(len(pi), self.first), len(ids)) if ids[i] not in self.special]
            if not pos:
                reason = (
                    f"response truncated away: the prompt alone has {len(pi)} tokens (max_tokens={self.max_tokens})"
                    if len(ri) and len(pi) >= self.max_tokens
                    else "response has no tokens to score (empty or whitespace only)"
                )
                out.append(reason)
                continue
            out.append(Example(ids, pos, truncated))
        return out


# Stands in for the prompt when a template is probed for its literal text; no pool prompt holds it.
_PROBE = "\x00igds-source\x00"


class PromptRenderer:
    """Writes stored pool prompts in a task template, so that scoring reads the positions that
    recall and causal filtering measured (they render every task example with `task.build_prompt`).

    `task` renders every prompt through template `template_index` (the prompt fills `{source}`;
    the template's other fields, e.g. translation's languages, come from the task's options).
    `auto` renders a prompt only when it is raw: when it does not already hold, in order, the
    literal text around `{source}` of one of the task's templates (whitespace at the pieces' ends
    ignored, so a stored prompt without the template's final newline still counts as templated).
    The check is a few substring searches per row, decided by the row's text alone.
    """

    def __init__(self, task: Any, template_index: int, mode: Literal["auto", "task"]) -> None:
        from igds_ray.tasks import TaskExample

        if mode not in ("auto", "task"):
            raise ValueError(f"mode must be auto or task, got {mode!r}")
        n = task.num_templates
        if not 0 <= template_index < n:
            raise ConfigError(f"pool.template_index: {template_index}, but task {task.name!r} has {n} template(s)")
        self.task, self.template_index, self.mode = task, template_index, mode
        self._example = TaskExample
        self.literals: list[tuple[str, ...]] = []
        self.bare = False  # template `template_index` has no text around `{source}`
        for i in range(n):
            probe = task.build_prompt(TaskExample(id="probe", source=_PROBE, reference=""), i)
            if _PROBE not in probe:
                if mode == "auto":
                    raise ConfigError(f"pool.prompt_template: auto cannot tell raw prompts from templated ones: "
                                      f"task {task.name!r} template {i} does not hold the prompt verbatim; "
                                      "set pool.prompt_template to task or none")
                continue
            pieces = tuple(p.strip() for p in probe.split(_PROBE) if p.strip())
            if pieces:  # a bare `{source}` template says nothing about a prompt
                self.literals.append(pieces)
            elif i == template_index:
                self.bare = True  # rendering would change whitespace at most

    def is_templated(self, prompt: str) -> bool:
        """Whether `prompt` already holds the literal text of one of the task's templates, in order."""
        if self.bare:
            return True
        for pieces in self.literals:
            at = 0
            for piece in pieces:
                at = prompt.find(piece, at)
                if at < 0:
                    break
                at += len(piece)
            else:
                return True
        return False

    def render(self, prompts: Sequence[str]) -> tuple[list[str], list[bool]]:
        """(prompts as the model reads them, whether each was put into the template)."""
        out, rendered = [], []
        for p in prompts:
            do = self.mode == "task" or not self.is_templated(p)
            out.append(self.task.build_prompt(self._example(id="pool", source=p, reference=""), self.template_index)
                       if do else p)
            rendered.append(do)
        return out, rendered


def prompt_mode(cfg: "ScoreConfig") -> str:
    """How prompts are written before scoring: none, chat, task or auto (`pool.prompt_template`,
    resolved: a text column is never rendered, and auto without a task scores prompts as stored)."""
    p = cfg.pool
    if p.text_column or (p.prompt_template == "auto" and not cfg.task):
        return "none"
    return p.prompt_template


def build_task(cfg: "ScoreConfig") -> Any:  # noqa: ANN401
    """The task whose template prompts are rendered in, or None when prompts are scored as stored."""
    if prompt_mode(cfg) not in ("auto", "task"):
        return None
    from igds_ray.tasks import get_task

    try:
        return get_task(cfg.task, **cfg.task_options)
    except (LookupError, TypeError, ValueError) as e:
        raise ConfigError(f"task: {e}") from None


def prompt_facts(cfg: "ScoreConfig") -> dict[str, Any]:
    """The manifest's account of how prompts were written (rendered_rows is added from the parts)."""
    mode = prompt_mode(cfg)
    facts: dict[str, Any] = {"prompt_template": cfg.pool.prompt_template, "applied": mode, "task": cfg.task,
                             "template_index": cfg.pool.template_index if mode in ("auto", "task") else None}
    if cfg.pool.text_column:
        facts["note"] = "text column: scored as stored (a text column is never rendered)"
    elif cfg.pool.prompt_template == "auto" and mode == "none":
        facts["note"] = "no task given: prompts scored as stored, never rendered into a task template"
    return facts


def split_built(rows: Sequence[int], built: Sequence[T | str], errors: list[str | None]) -> tuple[list[int], list[T]]:
    """Route what a builder returned for `rows`: a string is that row's error (written into
    `errors[row]`), anything else is kept. Returns (rows kept, their items), in order."""
    kept_rows: list[int] = []
    items: list[T] = []
    for i, b in zip(rows, built):
        if isinstance(b, str):
            errors[i] = b
        else:
            kept_rows.append(i)
            items.append(b)
    return kept_rows, items
