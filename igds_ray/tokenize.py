"""Turn pool rows into model inputs and the positions whose activations are pooled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, TypeVar

Pooling = Literal["last", "max", "mean"]
T = TypeVar("T")

# Characters kept before tokenizing: bounds the cost of a pathological multi-megabyte text.
CHARS_PER_TOKEN_CAP = 32


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    positions: list[int]  # positions pooled (one for `last`)
    truncated: bool


class ExampleBuilder:
    """Tokenizes rows the same way for scoring, recall and baselines.

    - `text` rows: BOS + text; `last` reads the last token, max/mean all tokens.
    - prompt + response rows: BOS + prompt (optionally in the chat template) + response, the two
      tokenized separately so the boundary is exact. `last` reads the last prompt token and, since
      the model is causal, only the prompt is run; max/mean read the response tokens.
    Special tokens (BOS, template markers, padding) are never pooled. Over `max_tokens`, `last`
    keeps the first token and the end of the prompt (so the token read is still the prompt's last);
    max/mean keep the start. Either way `truncated` is set.
    """

    def __init__(self, tokenizer: Any, pooling: Pooling, max_tokens: int, chat_template: bool = False) -> None:
        if pooling not in ("last", "max", "mean"):
            raise ValueError(f"pooling must be last, max or mean, got {pooling!r}")
        self.tok = tokenizer
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.chat_template = chat_template
        self.special = frozenset(int(i) for i in tokenizer.all_special_ids)
        self.char_cap = max_tokens * CHARS_PER_TOKEN_CAP

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
            pos = [i for i, t in enumerate(ids) if t not in self.special]
            if not pos:
                out.append("text has no tokens to score (empty or whitespace only)" if not was_cut else "text has no tokens to score")
                continue
            out.append(Example(ids, pos[-1:] if self.pooling == "last" else pos, truncated))
        return out

    def build_pairs(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Example | str]:
        out: list[Example | str] = []
        p_ids, p_cut = self.prompt_ids(prompts)
        if self.pooling == "last":
            for ids, was_cut in zip(p_ids, p_cut):
                truncated = was_cut or len(ids) > self.max_tokens
                if len(ids) > self.max_tokens:
                    keep = self.max_tokens - 1
                    ids = ids[:1] + ids[len(ids) - keep :] if keep > 0 else ids[-1:]
                pos = [i for i, t in enumerate(ids) if t not in self.special]
                if not pos:
                    out.append("prompt has no tokens to score (empty or whitespace only)")
                    continue
                out.append(Example(ids, pos[-1:], truncated))
            return out
        r_ids, r_cut = self.response_ids(responses)
        for pi, rcut, pcut, ri in zip(p_ids, r_cut, p_cut, r_ids):
            ids = pi + ri
            truncated = pcut or rcut or len(ids) > self.max_tokens
            ids = ids[: self.max_tokens]
            pos = [i for i in range(len(pi), len(ids)) if ids[i] not in self.special]
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
