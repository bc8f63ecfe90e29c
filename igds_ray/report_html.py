"""`<run>/report/report.html`: one self-contained page (images inline as data URIs, no external script or
style) holding everything report.md holds (the arms table with costs, the verdict, the plots, the
selection composition) and a feature card per recalled candidate and chosen feature (`stages/cards.py`).

The Markdown part is converted from report.md's own lines (the subset the report writes: headings,
tables, bullet lists, images, bold and code spans), so the two cannot disagree.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from typing import Any, Sequence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
line-height:1.4;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}code{background:#f4f4f4;padding:0 3px;border-radius:3px}
img.plot{max-width:100%;margin:6px 0}.card{border:1px solid #ccc;border-radius:8px;padding:10px 16px;margin:18px 0;
background:#fcfcfc}.badge{display:inline-block;font-size:.72em;padding:2px 7px;border-radius:10px;background:#e8e8e8;
margin-left:6px;vertical-align:middle}.badge.chosen{background:#ffd9b3}.facts{font-size:.9em;color:#444}
.ex{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.82em;white-space:pre-wrap;word-break:break-word;
border-left:3px solid #eee;padding:2px 8px;margin:4px 0}.ex .meta{color:#777;font-family:system-ui,sans-serif}
.tok{border-radius:2px}.unread{opacity:.55}.sep{color:#999}.lens span{font-family:ui-monospace,monospace;
background:#eef;margin:1px 3px;padding:0 3px;border-radius:3px;display:inline-block}.lens .neg{background:#fee}
.note{color:#666;font-size:.85em;font-weight:normal}.wide{overflow-x:auto}
"""

_IMG = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")


def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"(https?://[^\s<]+)", r"<a href='\1'>\1</a>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def markdown_to_html(lines: Sequence[str], image_dir: str) -> str:
    """report.md's lines as HTML; an image line becomes an inline PNG read from `image_dir`."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\n")
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<div class='wide'><table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in block[0])
                       + "</tr>" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                                           for r in body) + "</table></div>")
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:].rstrip())}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        m = _IMG.match(line.strip())
        if m:
            path = os.path.join(image_dir, m.group(2))
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out.append(f'<img class="plot" alt="{html.escape(m.group(1))}" src="{data_uri(f.read())}">')
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _fig_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def card_plot(card: dict) -> bytes | None:
    """The card's histogram (stacked by label, exact zeros as their own bar) beside its causal curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    h, trials = card.get("histogram"), [t for t in card.get("causal") or [] if t.get("status") == "ok"]
    if not h and not trials:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 2.8))
    ax = axes[0]
    if h:
        edges = np.asarray(h["edges"])
        width = edges[1] - edges[0]
        bottom = np.zeros(len(edges) - 1)
        zero_bottom = 0.0
        for name in sorted(h["counts"], key=lambda k: -sum(h["counts"][k]) - h["zero"].get(k, 0)):
            c = np.asarray(h["counts"][name], float)
            bars = ax.bar(edges[:-1] + width / 2, c, width=width * 0.95, bottom=bottom, label=name)
            z = h["zero"].get(name, 0)
            ax.bar([-width], [z], width=width * 0.95, bottom=[zero_bottom], color=bars.patches[0].get_facecolor()
                   if bars.patches else None)
            bottom += c
            zero_bottom += z
        ax.set_yscale("symlog")
        ax.set_xlabel("pooled activation (bar left of 0: exactly 0)")
        ax.set_ylabel("rows")
        ax.set_title(h.get("source", ""), fontsize=8)
        if len(h["counts"]) > 1:
            ax.legend(fontsize=6, ncol=2)
    else:
        ax.axis("off")
    ax = axes[1]
    if trials:
        x = [t["factor"] for t in trials]
        for key, lo, hi, name in (("delta", "delta_ci_low", "delta_ci_high", "task metric Δ"),
                                  ("loglik_delta", "loglik_ci_low", "loglik_ci_high", "reference log-lik Δ")):
            y = [t.get(key) for t in trials]
            if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in y):
                continue
            yerr = [[max(0.0, (t[key] - t[lo])) if t.get(lo) is not None else 0.0 for t in trials],
                    [max(0.0, (t[hi] - t[key])) if t.get(hi) is not None else 0.0 for t in trials]]
            ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=name)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_xlabel("intervention factor")
        ax.set_ylabel("Δ against the base (CI)")
        ax.set_title("causal trials on the dev set", fontsize=8)
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "no causal trial\n(not searched)", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
    fig.tight_layout()
    return _fig_png(fig)


def tokens_html(ex: dict, scale: float) -> str:
    """One example's tokens, each shaded by its activation (`scale`: the activation of full shade); tokens
    scoring does not read are dimmed, and the prompt/response boundary is marked."""
    parts = []
    read, special = set(ex.get("read") or []), set(ex.get("special") or [])
    for i, (t, a) in enumerate(zip(ex["tokens"], ex["acts"])):
        if i == ex.get("boundary") and i > 0:
            parts.append('<span class="sep">⏎response⏎ </span>')
        # special tokens (BOS, template markers) are never read; their often large values would wash out the rest
        alpha = 0.0 if scale <= 0 or i in special else min(1.0, max(0.0, a / scale))
        cls = "tok" + ("" if i in read else " unread")
        parts.append(f'<span class="{cls}" title="{a:.4g}" style="background:rgba(255,120,0,{alpha:.2f})">'
                     f"{html.escape(t)}</span>")
    return "".join(parts)


def _examples(title: str, rows: Sequence[dict], note: str = "") -> str:
    if not rows:
        return f"<h4>{html.escape(title)}</h4><p class='note'>none active{html.escape(note)}</p>"
    scale = max(max([a for i, a in enumerate(r["acts"]) if i not in set(r.get("special") or [])], default=0.0)
                for r in rows)
    out = [f"<h4>{html.escape(title)}</h4>"]
    for r in rows:
        meta = [f"value {r['value']:.4g}"] + [f"{k} {r[k]}" for k in ("id", "label") if r.get(k) is not None]
        if r.get("src_file") is not None:
            meta.append(f"{r['src_file']}:{r['src_row']}")
        if r.get("truncated"):
            meta.append("truncated")
        out.append(f"<div class='ex'><span class='meta'>{html.escape(' · '.join(map(str, meta)))}</span><br>"
                   f"{tokens_html(r, scale)}</div>")
    return "".join(out)


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else html.escape(str(v))


def card_html(card: dict) -> str:
    f = card["feature"]
    badges = "".join(f"<span class='badge chosen'>chosen by {html.escape(a)}</span>" for a in card["chosen_by"])
    if card.get("candidate_rank") is not None:
        badges += f"<span class='badge'>recall candidate #{card['candidate_rank']}</span>"
    link = (f" <a href='{html.escape(card['neuronpedia'])}'>Neuronpedia page</a>" if card.get("neuronpedia")
            else " <span class='note'>no Neuronpedia page (not a release sae-lens knows one for)</span>")
    facts = []
    r = card.get("recall")
    if r:
        facts.append(f"recall: active on {r['frequency']:.1%} of {r['n_units']} task units, mean activation when "
                     f"active {r['mean_act']:.4g}")
    ct = card.get("contrast")
    if ct:
        facts.append(f"contrast (igds_response): AUROC {ct['auroc_a']:.3f} on the search half, {ct['auroc_b']:.3f} "
                     f"[{ct['ci_low_b']:.3f}, {ct['ci_high_b']:.3f}] held out")
    src = card.get("pool_source") or {}
    if src.get("kind") == "scored":
        facts.append(f"pool: scored over the whole pool ({html.escape(str(src.get('pooling')))}), selected by "
                     f"{', '.join(src.get('arms', []))}")
    elif src.get("kind") == "sample":
        facts.append(f"pool: not scored by any arm; a sample of {src.get('rows')} rows read as igds scores "
                     f"({html.escape(str(src.get('pooling')))})")
    out = [f"<section class='card' id='card-{html.escape(f)}'><h3>{html.escape(f)}{badges}{link}</h3>",
           "<div class='facts'>" + "<br>".join(html.escape(x) for x in facts) + "</div>"]
    png = card_plot(card)
    if png:
        out.append(f"<img class='plot' alt='{html.escape(f)} histogram and causal curve' src='{data_uri(png)}'>")
    trials = card.get("causal") or []
    if trials:
        out.append("<table><tr><th>factor</th><th>metric Δ [CI]</th><th>Holm p</th><th>log-lik Δ [CI]</th>"
                   "<th>Holm p</th><th>held-out Δ [CI]</th><th>kept</th></tr>" + "".join(
                       f"<tr><td>{_fmt(t['factor'], 'g')}</td><td>{_fmt(t.get('delta'))} "
                       f"[{_fmt(t.get('delta_ci_low'))}, "
                       f"{_fmt(t.get('delta_ci_high'))}]</td><td>{_fmt(t.get('p_holm'), '.3g')}</td>"
                       f"<td>{_fmt(t.get('loglik_delta'))} [{_fmt(t.get('loglik_ci_low'))}, "
                       f"{_fmt(t.get('loglik_ci_high'))}]</td><td>{_fmt(t.get('loglik_p_holm'), '.3g')}</td>"
                       f"<td>{_fmt(t.get('confirm_delta'))} [{_fmt(t.get('confirm_ci_low'))}, "
                       f"{_fmt(t.get('confirm_ci_high'))}]</td><td>{'yes' if t.get('kept') else ''}</td></tr>"
                       for t in trials) + "</table>")
    lens = card.get("logit_lens") or {}
    if lens:
        out.append("<h4>Logit lens (W_dec[f] · W_U)</h4><div class='lens'>promotes: " + "".join(
            f"<span title='{v:.3g}'>{html.escape(repr(t))}</span>" for t, v in lens["promoted"])
            + "<br>suppresses: " + "".join(f"<span class='neg' title='{v:.3g}'>{html.escape(repr(t))}</span>"
                                          for t, v in lens["suppressed"]) + "</div>")
    out.append(_examples("Top task prompts", card.get("task_examples") or []))
    where = "whole scored pool" if src.get("kind") == "scored" else "pool sample"
    out.append(_examples(f"Top pool rows ({where})", card.get("pool_examples") or []))
    return "".join(out) + "</section>"


def cards_html(cards: dict | None) -> str:
    if not cards:
        return ""
    if not cards.get("cards"):
        return f"<h2>Feature cards</h2><p class='note'>{html.escape(cards.get('note', 'no cards'))}</p>"
    rows = []
    for c in cards["cards"]:
        best = max((t for t in c.get("causal") or [] if t.get("status") == "ok" and t.get("delta") is not None
                    and not math.isnan(t["delta"])), key=lambda t: t["delta"], default=None)
        rows.append(f"<tr><td><a href='#card-{html.escape(c['feature'])}'>{html.escape(c['feature'])}</a></td>"
                    f"<td>{html.escape(', '.join(c['chosen_by']) or '–')}</td>"
                    f"<td>{_fmt((c.get('recall') or {}).get('frequency'), '.1%')}</td>"
                    f"<td>{_fmt(best['delta'] if best else None)} "
                    f"{'(×' + _fmt(best['factor'], 'g') + ')' if best else ''}"
                    f"</td></tr>")
    head = ("<h2>Feature cards</h2><p class='note'>Every recalled candidate and every chosen feature. Shading: "
            "the token's activation (hover for the value); dimmed tokens are not read by the score.</p>"
            "<table><tr><th>feature</th><th>chosen by</th><th>recall frequency</th><th>best metric Δ</th></tr>"
            + "".join(rows) + "</table>")
    return head + "".join(card_html(c) for c in cards["cards"])


def write(path: str, md_lines: Sequence[str], image_dir: str, cards: dict | None, extra_html: str = "") -> str:
    """Write the page atomically; returns its path."""
    body = markdown_to_html(md_lines, image_dir) + extra_html + cards_html(cards)
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>IGDS run report</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
