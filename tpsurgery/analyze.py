"""The paper's analyses, built on :meth:`tpsurgery.Embedder.trace`: the dependency analysis of its Figure 5 and the
attention mass that sentence tokens put on ``<PST>``.

**Dependency** (paper section 5.9, after Ethayarajh 2019): per sentence, the Spearman correlation (over the hidden
dimensions) between the last token's hidden state (the pivot) and each other sentence token's, averaged over those
tokens, at ``hidden_states[j]`` for each chosen ``j``: one score per sentence, shown as a box plot per layer for the
recipe and a baseline (by default the recipe without ``tp``).

**Attention mass on <PST>**: per decoder layer and head, the attention probability that sentence tokens (queries in
the ``{text}`` span) put on the placeholder key(s), summed over placeholders and averaged over sentence tokens and
sentences; the same for the last token's query. Attention probabilities are the attention module's second output
(``self_attn.output[1]`` in the trace), which transformers only computes with eager attention: the model runs with
``attn_implementation = "eager"`` for the analysis (:func:`eager_attention`; restored after).

>>> import tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama", n_layers=4)
>>> emb = tpsurgery.apply(model, "prompt: 'This sentence : <PST> {text} means'\\ntp: {start: 0, stop: 2}\\n"
...                              "exit_layer: 4", tokenizer=tok)
>>> scores = dependency_scores(emb, ["a b c", "d e f g"], layers=(2, 4))
>>> sorted(scores), len(scores[4]), all(-1 <= s <= 1 for s in scores[4])
([2, 4], 2, True)
>>> mass = attention_mass(emb, ["a b c", "d e f g"])
>>> mass["sentence"].shape, bool(((mass["sentence"] >= 0) & (mass["sentence"] <= 1)).all())
((4, 4), True)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .arch import get_path
from .errors import InputError, ModelError, RecipeError
from .plots import agg_figure
from .recipe import Recipe
from .textio import chunked


def without_tp(recipe: Recipe) -> Recipe:
    """``recipe`` with its ``tp`` section removed (the placeholder stays in the prompt, never overwritten).

    >>> from tpsurgery.recipe import parse_recipe
    >>> without_tp(parse_recipe("name: x\\nprompt: '<PST> {text}'\\ntp: {start: 1, stop: 3}")).tp.empty
    True
    """
    if recipe.tp.empty:
        raise RecipeError("tp", "the recipe has no TP to remove; give the baseline recipe explicitly")
    return recipe.replace(tp={}, name=f"{recipe.name or 'recipe'} without tp")


def _check_layers(emb: Any, layers: Sequence[int]) -> list[int]:
    n = emb.n_layers
    out = sorted({j if j >= 0 else n + 1 + j for j in layers})
    bad = [j for j in out if not 0 < j <= n]
    if bad or not out:
        raise InputError(None, f"layers {list(layers)}: hidden_states indices must be in 1..{n} (or -{n}..-1)")
    return out


def spearman_to_pivot(tokens: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
    """``[T]``: the Spearman correlation of each row of ``tokens`` ``[T, d]`` with ``pivot`` ``[d]`` (Pearson of ranks;
    hidden states have no ties in practice).

    >>> spearman_to_pivot(torch.tensor([[1., 2., 3.], [3., 2., 1.], [1., 3., 2.]]), torch.tensor([10., 20., 30.]))
    tensor([ 1.0000, -1.0000,  0.5000])
    """
    def ranks(x: torch.Tensor) -> torch.Tensor:
        r = x.argsort(-1).argsort(-1).double()
        return r - r.mean(-1, keepdim=True)

    a, b = ranks(tokens.double()), ranks(pivot.double())
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm())).float()


def dependency_scores(emb: Any, texts: Sequence[str], layers: Sequence[int], batch_size: int = 16,
                      template: int | None = None) -> dict[int, list[float]]:
    """``{j: [score per text]}``: the mean Spearman correlation between the last token's ``hidden_states[j]`` and
    each sentence token's (the last token itself excluded), under ``emb``'s recipe (NaN for a text without another
    sentence token)."""
    js = _check_layers(emb, layers)
    out: dict[int, list[float]] = {j: [] for j in js}
    for _, chunk in chunked(iter(texts), batch_size):
        saved: list = []
        with torch.no_grad():
            with emb.trace(chunk, template=template) as run:
                for j in js:
                    saved.append(run.hidden_state(j).save())
        for j, h in zip(js, saved):
            for b, (start, end) in enumerate(run.sentence):
                cols = [c for c in range(start, end) if c != run.last]
                score = spearman_to_pivot(h[b, cols].float(), h[b, run.last].float()).mean() if cols else None
                out[j].append(float(score) if score is not None else float("nan"))
    return out


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run ``model`` with eager attention (which computes attention probabilities); restored on exit."""
    old = getattr(model.config, "_attn_implementation", None)
    if old == "eager":
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ModelError(f"{type(model).__name__} cannot switch to eager attention (no set_attn_implementation); "
                         "load it with attn_implementation='eager'")
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def attention_module_path(emb: Any) -> str:
    """The attention module's path from a decoder layer: the parent of the attention output projection."""
    attn_out = emb.spec.attn_out
    if not attn_out or "." not in attn_out:
        raise ModelError(f"tpsurgery knows no attention module of {type(emb.model).__name__} (ArchSpec.attn_out)")
    return attn_out.rpartition(".")[0]


def attention_mass(emb: Any, texts: Sequence[str], batch_size: int = 16, template: int | None = None
                   ) -> dict[str, np.ndarray]:
    """``{"sentence": [n_layers, heads], "last": [n_layers, heads]}``: the attention probability put on the
    placeholder key(s) (summed over placeholders) by sentence-token queries (mean over them and the texts) and by the
    last token's query (mean over texts), per decoder layer and head, under ``emb``'s recipe (eager attention)."""
    if not any(emb.tokenize(["x"], t, warn=False)[0].placeholders for t in emb.recipe.templates):
        raise RecipeError("prompt", "the attention analysis needs a prompt with a <PST> placeholder")
    path = attention_module_path(emb)
    n = emb.n_layers
    sums: dict[str, Any] = {"sentence": 0.0, "last": 0.0}
    counts = {"sentence": 0, "last": 0}
    with eager_attention(emb.model):
        for _, chunk in chunked(iter(texts), batch_size):
            saved: list = []
            with torch.no_grad():
                with emb.trace(chunk, template=template) as run:
                    for i in range(n):
                        saved.append(get_path(run.layers[i], path).output[1].save())
            probs = torch.stack([p.float() for p in saved], 1)  # [B, n, H, L, L]
            if probs.dim() != 5:
                raise ModelError(f"the attention of {type(emb.model).__name__} returned no probabilities")
            ph = run.batch.placeholders
            for b, (start, end) in enumerate(run.sentence):
                on_ph = probs[b][..., ph[b]].sum(-1)  # [n, H, L]: mass each query puts on the placeholders
                if end > start:
                    sums["sentence"] = sums["sentence"] + on_ph[..., start:end].sum(-1)
                    counts["sentence"] += end - start
                sums["last"] = sums["last"] + on_ph[..., run.last]
                counts["last"] += 1
    return {k: (sums[k] / max(counts[k], 1)).numpy() if counts[k] else np.full((n, 0), np.nan) for k in sums}


# -- reports: JSON, markdown, PNG --------------------------------------------------------------------------------
def _summary(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "q1": float("nan"), "q3": float("nan")}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(len(v)), "mean": float(v.mean()), "median": float(med), "q1": float(q1), "q3": float(q3)}


def dependency_report(scores: dict[str, dict[int, list[float]]], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a dependency analysis: ``meta`` (model, recipes, texts, command), per recipe label and layer the
    per-sentence scores and their summary (n, mean, median, quartiles)."""
    return {**meta, "analysis": "dependency", "results": {
        label: {str(j): {"summary": _summary(v), "scores": [round(x, 6) for x in v]} for j, v in by_layer.items()}
        for label, by_layer in scores.items()}}


def dependency_table(report: dict[str, Any]) -> str:
    """Markdown: one row per layer, mean (median) of the sentence-level scores x100 per recipe, and the difference of
    the means (first recipe minus second)."""
    labels = list(report["results"])
    layers = list(report["results"][labels[0]])
    pair = len(labels) == 2
    head = "| hidden_states | " + " | ".join(f"{lab}: mean (median)" for lab in labels) + \
        (" | mean difference | sentences where the first is higher |" if pair else " |")
    lines = [head, "|" + "---|" * (len(labels) + 1 + 2 * pair)]
    for j in layers:
        s = [report["results"][lab][j]["summary"] for lab in labels]
        cells = [f"{x['mean'] * 100:.2f} ({x['median'] * 100:.2f})" for x in s]
        diff = []
        if pair:  # the same sentences in the same order: paired
            a, b = (np.asarray(report["results"][lab][j]["scores"], dtype=np.float64) for lab in labels)
            ok = np.isfinite(a) & np.isfinite(b)
            diff = [f"{(s[0]['mean'] - s[1]['mean']) * 100:+.2f}", f"{(a[ok] > b[ok]).mean():.0%}" if ok.any() else "n/a"]
        lines.append(f"| {j} | " + " | ".join(cells + diff) + " |")
    return "\n".join(lines) + "\n"


def dependency_plot(report: dict[str, Any], path: Any) -> None:
    """Box plot (PNG): per layer, one box per recipe of the sentence-level Spearman scores x100."""
    labels = list(report["results"])
    layers = list(report["results"][labels[0]])
    fig = agg_figure(max(5.0, 1.4 * len(layers) * len(labels)), 4.5, "analysis plots")
    ax = fig.add_subplot()
    width = 0.8 / len(labels)
    for k, lab in enumerate(labels):
        data = [[x * 100 for x in report["results"][lab][j]["scores"] if np.isfinite(x)] for j in layers]
        pos = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(layers))]
        box = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{k}")
            patch.set_alpha(0.6)
        ax.plot([], [], color=f"C{k}", lw=8, alpha=0.6, label=lab)
    ax.set_xticks(range(len(layers)), [f"hidden_states[{j}]" for j in layers])
    ax.set_ylabel("sentence-level Spearman x100 (last token vs others)")
    ax.set_title(f"{report.get('model', '')}: dependency on the last token, {report.get('n_texts', '?')} sentences")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def attention_report(masses: dict[str, dict[str, np.ndarray]], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON of an attention analysis: per recipe label and query kind (``sentence``, ``last``) the
    ``[layer][head]`` mass on the placeholders."""
    return {**meta, "analysis": "attention", "results": {
        label: {kind: np.round(m, 6).tolist() for kind, m in by_kind.items()} for label, by_kind in masses.items()}}


def attention_table(report: dict[str, Any]) -> str:
    """Markdown: per decoder layer, the mass on <PST> averaged over heads (and the largest head) per recipe and query."""
    cols = [(lab, kind) for lab, by_kind in report["results"].items() for kind in by_kind]
    n = len(next(iter(report["results"].values()))["sentence"])
    lines = ["| layer | " + " | ".join(f"{lab}, {kind} queries: mean (max head)" for lab, kind in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for i in range(n):
        cells = []
        for lab, kind in cols:
            row = np.asarray(report["results"][lab][kind][i])
            cells.append(f"{row.mean():.3f} ({row.max():.3f})" if row.size else "n/a")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def attention_plot(report: dict[str, Any], path: Any) -> None:
    """Heatmaps (PNG): layer x head mass on <PST>, one panel per recipe and query kind, one colour scale."""
    panels = [(lab, kind, np.asarray(m)) for lab, by_kind in report["results"].items() for kind, m in by_kind.items()]
    top = max([float(np.nanmax(m)) for _, _, m in panels if m.size] + [1e-9])
    cols = 2
    rows = (len(panels) + 1) // cols
    fig = agg_figure(4.2 * cols, 3.6 * rows, "analysis plots")
    for k, (lab, kind, m) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        im = ax.imshow(m, aspect="auto", origin="lower", vmin=0.0, vmax=top, cmap="viridis")
        ax.set_title(f"{lab}\n{kind} queries -> <PST>", fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("decoder layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
