"""Translation (WMT): chrF and BLEU through sacrebleu."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from igds_ray.tasks.base import ID, REFERENCE, SOURCE, SkipRow, Task, TaskDataError, TaskExample, _counts, _pick

TRANSLATION_TEMPLATES: tuple[str, ...] = (
    "Translate the following {src_lang} text into {tgt_lang}.\n\n{src_lang}: {source}\n{tgt_lang}:\n",
    "{src_lang}: {source}\n{tgt_lang}:\n",
    "Translate from {src_lang} to {tgt_lang}.\nText: {source}\nTranslation:\n",
)

LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic",
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "fi": "Finnish",
    "fr": "French",
    "gu": "Gujarati",
    "hi": "Hindi",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "kk": "Kazakh",
    "ko": "Korean",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "nl": "Dutch",
    "pl": "Polish",
    "ps": "Pashto",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "ta": "Tamil",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "zh": "Chinese",
}

TRANSLATION = "translation"  # column role: a dict column {lang: text}, as in the HF WMT datasets

# sacrebleu's own choices for targets without spaces; the mecab tokenizers need extra packages.
_BLEU_TOKENIZE = {"zh": "zh", "ja": "char", "ko": "char", "th": "char"}


def language_name(code: str) -> str:
    """English name of a language code ("de" -> "German"); unknown codes are returned as is."""
    return LANGUAGE_NAMES.get(code.lower().split("-")[0].split("_")[0], code)


@dataclass(frozen=True, kw_only=True)
class TranslationTask(Task):
    """Translate ``src_lang`` -> ``tgt_lang`` (default de -> en).

    Headline ``metric`` is corpus chrF / 100 (in [0, 1]); ``chrf`` and ``bleu`` keep sacrebleu's
    0-100 scale. The per-example score is sentence chrF / 100. Data comes either from a dict column
    ``translation`` ({"de": ..., "en": ...}, the HF WMT layout), from columns named by the language
    codes, or from ``source``/``reference`` columns given in the column mapping.
    """

    name: str = "translation"
    templates: tuple[str, ...] = TRANSLATION_TEMPLATES
    src_lang: str = "de"
    tgt_lang: str = "en"
    source_columns: tuple[str, ...] = ()  # empty: the language codes (see column_roles)
    reference_columns: tuple[str, ...] = ()
    translation_column: str = TRANSLATION
    stop_sequences: tuple[str, ...] = ("\n",)  # a sentence translation is one line
    bleu_tokenize: str | None = None  # None: "13a", or sacrebleu's choice for zh/ja/ko/th targets
    description: str = "Machine translation (WMT): chrF and BLEU via sacrebleu."

    def __post_init__(self) -> None:
        if not self.src_lang or not self.tgt_lang or self.src_lang == self.tgt_lang:
            raise ValueError(f"translation needs two different languages, got {self.src_lang!r} -> {self.tgt_lang!r}")
        super().__post_init__()

    def format_fields(self, example: TaskExample) -> dict[str, str]:
        return {
            "source": example.source,
            "src_lang": language_name(self.src_lang),
            "tgt_lang": language_name(self.tgt_lang),
            "src_code": self.src_lang,
            "tgt_code": self.tgt_lang,
        }

    @property
    def tokenize(self) -> str:
        return self.bleu_tokenize or _BLEU_TOKENIZE.get(self.tgt_lang.split("-")[0], "13a")

    def score_answer(self, answer: str, example: TaskExample) -> float:
        import sacrebleu

        return sacrebleu.sentence_chrf(answer, [example.reference]).score / 100.0

    def corpus_metric(self, predictions: Sequence[str | None], examples: Sequence[TaskExample]) -> dict[str, float]:
        import sacrebleu

        answers = self._answers(predictions, examples)
        # An unparseable output is an empty hypothesis: it still counts against the corpus score.
        hyps = [a or "" for a in answers]
        refs = [[ex.reference for ex in examples]]  # one reference stream
        chrf = sacrebleu.corpus_chrf(hyps, refs).score
        bleu = sacrebleu.corpus_bleu(hyps, refs, tokenize=self.tokenize).score
        return {"metric": chrf / 100.0, "chrf": chrf, "bleu": bleu, **_counts(answers)}

    # ---- loading -------------------------------------------------------------------------------
    def column_roles(self) -> dict[str, tuple[str, ...]]:
        return {
            SOURCE: self.source_columns or (self.src_lang,),
            REFERENCE: self.reference_columns or (self.tgt_lang,),
        }

    def resolve_columns(self, available: Sequence[str], columns: Mapping[str, str] | None = None) -> dict[str, str]:
        user = dict(columns or {})
        dict_col = user.pop(TRANSLATION, None)
        flat = SOURCE in user or REFERENCE in user
        if dict_col is None and not flat and self.translation_column in available:
            dict_col = self.translation_column
        if dict_col is not None:
            if flat:
                raise TaskDataError(
                    f"task {self.name!r}: give either a {TRANSLATION!r} column or source/reference columns, not both"
                )
            out = {TRANSLATION: _pick(TRANSLATION, (dict_col,), available, self.name)}
            unknown = set(user) - {ID}
            if unknown:
                raise TaskDataError(f"task {self.name!r}: unknown column role(s) {sorted(unknown)}")
            if ID in user:
                out[ID] = _pick(ID, (user[ID],), available, self.name)
            return out
        try:
            return super().resolve_columns(available, user)
        except TaskDataError as e:
            raise type(e)(
                f"{e} A translation task reads a dict column {self.translation_column!r} "
                f"({{{self.src_lang!r}: ..., {self.tgt_lang!r}: ...}}), "
                f"columns named {self.src_lang!r}/{self.tgt_lang!r}, "
                f"or the columns mapped to 'source'/'reference'."
            ) from None

    def fields_from_row(self, row: Mapping[str, Any], mapping: Mapping[str, str]) -> tuple[Any, Any, dict[str, Any]]:
        meta = {"src_lang": self.src_lang, "tgt_lang": self.tgt_lang}
        if TRANSLATION not in mapping:
            return row.get(mapping[SOURCE]), row.get(mapping[REFERENCE]), meta
        col = mapping[TRANSLATION]
        pair = row.get(col)
        if pair is None:
            raise SkipRow(f"null {col!r}")
        if not isinstance(pair, Mapping):
            raise SkipRow(f"{col!r} is not a dict of languages")
        for lang in (self.src_lang, self.tgt_lang):
            if lang not in pair:
                raise SkipRow(f"{col!r} has no {lang!r} key")
        return pair[self.src_lang], pair[self.tgt_lang], meta
