"""The model half of feature cards: per-token activations of the card features on a few rows, read
exactly where scoring reads them, and the logit lens of their decoder directions.

One call (`token_pass`, run as a Ray task with the scorer's resources) loads the model up to the SAE's
layer and the SAE once, and handles three groups of rows:
- `task`: the task's own prompts (in the template causal filtering generates with): per feature, the
  rows with the highest activation over the positions recall reads, token by token;
- `sample`: a bounded sample of the pool, pooled as scoring pools (so candidates that no arm scored
  still get a histogram and top rows; labelled a sample wherever it is shown);
- `rows`: given pool rows (the top rows of the full scored pool, found from the scores' `acts`).
Only the rows a card shows come back token by token; the sample comes back as pooled values.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from igds_ray.tokenize import PROMPT_POOLINGS, ExampleBuilder


def _token_texts(tok: Any, ids: Sequence[int]) -> list[str]:
    """Each token as the text it stands for (a byte-level 'Ġx' or a sentencepiece '▁x' becomes ' x')."""
    toks = tok.convert_ids_to_tokens(list(ids))
    out = []
    for t in toks:
        try:
            out.append(tok.convert_tokens_to_string([t]))
        except Exception:  # noqa: BLE001 - a token that does not decode alone keeps its raw form
            out.append(str(t))
    return out


class TokenActs:
    """Model + k-feature encoder: rows in, [T, k] activations per row out (prompt then response)."""

    def __init__(self, model_cfg: Any, sae_cfg: Any, features: Sequence[str], token_budget: int = 16384) -> None:
        from igds_ray.models.loading import load_model, load_sae, load_tokenizer, resolve_device
        from igds_ray.models.runner import FeatureEncoder, LayerRunner
        from igds_ray.schema import parse_features

        self.feats = parse_features(list(features))
        layer = self.feats[0].layer
        self.device = resolve_device(model_cfg.device)
        self.tok = load_tokenizer(model_cfg)
        self.model = load_model(model_cfg, self.device, layers=layer + 1)
        self.sae = load_sae(sae_cfg, torch.device("cpu"))
        self.runner = LayerRunner(self.model, layer, prune=True)
        self.encoder = FeatureEncoder(self.sae, [f.index for f in self.feats]).to(self.device)
        self.token_budget = token_budget

    @torch.inference_mode()
    def logit_lens(self, n: int) -> dict[str, dict[str, list]]:
        """Per feature: the `n` tokens its decoder direction promotes most and least (W_dec[f] @ W_U), no
        final norm folded in."""
        w_u = self.model.get_output_embeddings().weight.detach().float().cpu()  # [V, d]
        w_dec = self.sae.W_dec.detach().float().cpu()[[f.index for f in self.feats]]  # [k, d]
        logits = w_dec @ w_u.T  # [k, V]
        out = {}
        for f, row in zip(self.feats, logits):
            top = torch.topk(row, min(n, row.numel()))
            bot = torch.topk(-row, min(n, row.numel()))
            out[str(f)] = {
                "promoted": [[t, float(v)] for t, v in zip(_token_texts(self.tok, top.indices.tolist()), top.values)],
                "suppressed": [[t, float(-v)] for t, v in zip(_token_texts(self.tok, bot.indices.tolist()),
                                                              bot.values)]}
        return out

    @torch.inference_mode()
    def per_token(self, ids_list: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """[len(ids), k] float32 per row; right-padded micro-batches without a mask (causal: padding is never
        read by a real token)."""
        out: list[np.ndarray | None] = [None] * len(ids_list)
        order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
        pad = self.tok.pad_token_id
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and (j - i + 1) * len(ids_list[order[j]]) <= self.token_budget:
                j += 1
            mb = order[i:j]
            T = max(len(ids_list[r]) for r in mb)
            ids = torch.full((len(mb), T), pad, dtype=torch.long)
            for n, r in enumerate(mb):
                ids[n, :len(ids_list[r])] = torch.tensor(list(ids_list[r]), dtype=torch.long)
            acts = self.encoder(self.runner(ids.to(self.device), None)).float().cpu().numpy()
            for n, r in enumerate(mb):
                out[r] = acts[n, :len(ids_list[r])]
            i = j
        return [a for a in out]  # type: ignore[misc]

    def rows(self, prompts: Sequence[str], responses: Sequence[str], pooling: str, max_tokens: int,
             chat_template: bool = False) -> list[dict | str]:
        """Per row: token ids with the positions scoring reads (`ExampleBuilder`, as the scorer builds them),
        the response appended for display when scoring reads only the prompt, the per-token activations and
        the pooled value scoring computes; a string when the row cannot be scored (the builder's reason)."""
        builder = ExampleBuilder(self.tok, pooling, max_tokens, chat_template)  # type: ignore[arg-type]
        built = builder.build_pairs(list(prompts), list(responses))
        resp_ids, _ = builder.response_ids(list(responses))
        rows: list[dict | str] = []
        ids_list = []
        for b, r in zip(built, resp_ids):
            if isinstance(b, str):
                rows.append(b)
                continue
            ids = list(b.input_ids)
            boundary = len(ids)
            if pooling in PROMPT_POOLINGS:  # the model is causal: appending the response moves no prompt value
                ids = ids + list(r[: max(0, max_tokens - len(ids))])
            else:
                boundary = min(b.positions) if b.positions else len(ids)
            rows.append({"ids": ids, "read": list(b.positions), "boundary": boundary, "truncated": b.truncated,
                         "special": [i for i, t in enumerate(ids) if t in builder.special]})
            ids_list.append(ids)
        acts = iter(self.per_token(ids_list))
        reduce = np.max if pooling in ("max", "prompt_max") else np.mean
        for row in rows:
            if isinstance(row, dict):
                a = next(acts)
                row["acts"] = a
                row["pooled"] = reduce(a[row["read"]], axis=0) if pooling != "last" else a[row["read"][-1]]
        return rows

    def shown(self, row: dict, f: int, meta: dict) -> dict:
        """One row as a card shows it for feature column `f`: its tokens with their activations."""
        return {**meta, "tokens": _token_texts(self.tok, row["ids"]), "acts": [round(float(x), 5) for x in
                                                                            row["acts"][:, f]],
                "read": row["read"], "boundary": row["boundary"], "truncated": row["truncated"],
                "special": row["special"],
                "value": float(row["pooled"][f])}


def top_rows(values: np.ndarray, n: int) -> list[list[int]]:
    """Per column of `values` [rows, k]: the indices of the `n` largest values above 0, largest first (ties:
    lower index first)."""
    out = []
    for f in range(values.shape[1]):
        col = values[:, f]
        order = np.lexsort((np.arange(len(col)), -col))
        out.append([int(i) for i in order[:n] if col[i] > 0])
    return out


def token_pass(model: dict, sae: dict, features: list[str], groups: dict[str, dict], n_examples: int,
               n_logit: int, token_budget: int, num_threads: int = 1) -> dict[str, Any]:
    """Runs inside a Ray task; see the module docstring. `groups` maps `task`/`sample`/`rows` to
    {prompts, responses, pooling, max_tokens, chat_template, meta (one dict per row)}."""
    from igds_ray.config import ModelConfig, SAEConfig, from_dict
    from igds_ray.models.loading import resolve_device

    mcfg = from_dict(ModelConfig, model)
    if resolve_device(mcfg.device).type == "cpu":
        torch.set_num_threads(max(1, num_threads))
    ta = TokenActs(mcfg, from_dict(SAEConfig, sae), features, token_budget)
    out: dict[str, Any] = {"logit_lens": ta.logit_lens(n_logit), "features": [str(f) for f in ta.feats]}
    for name, g in groups.items():
        kind = g.get("kind", name)
        rows = ta.rows(g["prompts"], g["responses"], g["pooling"], g["max_tokens"], g.get("chat_template", False))
        meta = g["meta"]
        ok = [i for i, r in enumerate(rows) if isinstance(r, dict)]
        pooled = np.zeros((len(rows), len(ta.feats)), np.float32)
        for i in ok:
            pooled[i] = rows[i]["pooled"]  # type: ignore[index]
        res: dict[str, Any] = {"n": len(rows), "unscorable": len(rows) - len(ok)}
        if kind == "rows":  # every given row, for the feature whose top row it is (`meta[i]["feature"]`)
            col = {str(f): j for j, f in enumerate(ta.feats)}
            res["shown"] = [ta.shown(r, col[m["feature"]], m) if isinstance(r, dict) else {**m, "error": r}
                            for r, m in zip(rows, meta)]
        else:
            tops = top_rows(pooled[ok] if ok else pooled[:0], n_examples)
            res["top"] = {str(feat): [ta.shown(rows[ok[i]], f, meta[ok[i]]) for i in tops[f]]  # type: ignore[arg-type]
                          for f, feat in enumerate(ta.feats)}
            if kind == "sample":
                res["pooled"] = pooled[ok].tolist()
                res["labels"] = [meta[i].get("label") for i in ok]
        out[name] = res
    return out
