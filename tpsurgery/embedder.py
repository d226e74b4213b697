"""The embedder: batching, pooling, early exit and sentence-transformers style ``encode``.

>>> from tpsurgery.testing import tiny_model
>>> import tpsurgery
>>> model, tok = tiny_model("llama")
>>> emb = tpsurgery.apply(model, "prompt: 'This sentence : <PST> \\"{text}\\" means'\\ntp: {start: 1, stop: 2}\\nexit_layer: 2", tokenizer=tok)
>>> emb.encode(["a b", "c d e"]).shape, emb.encode("a b").shape
((2, 32), (32,))
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from .arch import ArchSpec, arch_for, attn_out_module, get_path
from .backends import Backend
from .backends.pooling import combine
from .errors import InputError, ModelError, RecipeError, TpsurgeryError
from . import compose, foreign
from .placement import input_device
from .batch import collate
from .plan import Plan, compile_plan
from .batching import EncodeStats, Progress, check_budget, default_budget, timed, token_batches
from .cache import as_cache
from .prefix import Prefix, PrefixStore, shared_prefix_length, split_rows
from .prompts import Encoded, check_markers, encode_prompts, truncation_message
from .resources import PENDING_BYTES, at_user_index, caller_indices, check_texts, eval_mode, flush_results, \
    non_finite_message, non_finite_rows, run_splitting
from .recipe import Recipe
from .saving import save_embeddings


def _max_length(model: Any, tokenizer: Any) -> int | None:
    cfg = model.config
    limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    limits.append(tok_limit if tok_limit and tok_limit < 10**7 else None)
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def _placeholder_id(recipe: Recipe, tokenizer: Any, vocab_size: int) -> int:
    p = recipe.placeholder
    if p.token is not None:
        ids = tokenizer(p.token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RecipeError("placeholder.token", f"{p.token!r} is {len(ids)} tokens for this tokenizer; it must be one")
        return ids[0]
    if p.token_id >= vocab_size:
        raise RecipeError("placeholder.token_id", f"{p.token_id} is outside the vocabulary (size {vocab_size})")
    return p.token_id


class Embedder:
    """A recipe applied to a model: ``encode`` texts into embeddings; ``explain`` what the recipe does to one text.

    Made by :func:`tpsurgery.apply`, which also resolves ``exit_layer: auto`` (``exit_layer`` overrides the recipe's).
    """

    def __init__(self, model: Any, tokenizer: Any, recipe: Recipe, backend: Backend, spec: ArchSpec | None = None,
                 prefix_cache: bool | None = None, embedding_cache: Any = None, exit_layer: int | None = None,
                 max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.backend = backend
        self.spec = spec or arch_for(model)
        self.n_layers = len(get_path(model, self.spec.layers))
        self.hidden_size = hidden = get_path(model, self.spec.embed).weight.shape[1]
        vocab = get_path(model, self.spec.embed).weight.shape[0]
        if not getattr(tokenizer, "is_fast", False):  # placeholders sit on token boundaries from offset mappings
            raise ModelError(f"tpsurgery needs a fast (Rust-backed) tokenizer with offset mappings; got "
                             f"{type(tokenizer).__name__}. Load one with AutoTokenizer.from_pretrained(..., "
                             "use_fast=True) or pass tokenizer=")
        self.placeholder_id = _placeholder_id(recipe, tokenizer, vocab)
        if recipe.compat == "exact":  # a marker inside a word has no token boundary to sit on
            for k, template in enumerate(recipe.templates):
                check_markers(tokenizer, template, "prompt" if isinstance(recipe.prompt, str) else f"prompt.{k}")
        self.plan: Plan = self.plan_for(recipe, exit_layer)
        self.model_max_length = _max_length(model, tokenizer)
        self.max_length = self.model_max_length
        if max_length is not None:  # like sentence-transformers' max_seq_length: at most the model's limit
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise InputError(None, f"max_length must be a positive integer, got {max_length!r}")
            if self.model_max_length is not None and max_length > self.model_max_length:
                raise InputError(None, f"max_length {max_length} is beyond the model's limit of "
                                       f"{self.model_max_length} tokens")
            self.max_length = max_length
        if self.max_length is not None:  # a prompt that cannot hold even an empty sentence cannot encode anything
            for k, template in enumerate(recipe.templates):
                n = len(self._prompt_ids(template))
                if n > self.max_length:
                    raise RecipeError("prompt" if isinstance(recipe.prompt, str) else f"prompt.{k}",
                                      f"{n} tokens without any sentence: longer than the model's limit of "
                                      f"{self.max_length} tokens")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None and pad < vocab else 0
        # performance options (docs/performance.md): prompt-prefix KV reuse where exact; on-disk embedding cache
        self.prefix_cache = prefix_cache
        self.embedding_cache = as_cache(embedding_cache)
        self._prefixes = PrefixStore(model)
        self.stats = EncodeStats()

    def plan_for(self, recipe: Recipe, exit_layer: int | None = None) -> Plan:
        """``recipe`` compiled for this model (depth, widths, attention heads); ``exit_layer`` overrides the recipe's."""
        cfg = self.model.config
        n_heads = getattr(cfg, "num_attention_heads", None)
        try:
            proj = attn_out_module(self.spec, get_path(self.model, self.spec.layers)[0], 0)
            attn_width = getattr(proj, "in_features", None) or proj.weight.shape[0]
        except ModelError:
            attn_width = None
        plan = compile_plan(recipe, self.n_layers, get_path(self.model, self.spec.embed).weight.shape[1],
                            self.placeholder_id, exit_layer=exit_layer, n_heads=n_heads, attn_width=attn_width)
        for e in plan.at("attn_out_in"):  # a family without an o_proj-like module: say so now, not mid-encode
            attn_out_module(self.spec, get_path(self.model, self.spec.layers)[e.layer], e.layer, e.field)
        return plan

    # -- tokenization -------------------------------------------------------------------------------------------
    def _prompt_ids(self, template: str) -> list[int]:
        """The template's tokens with an empty sentence (no limit applied)."""
        return encode_prompts(self.tokenizer, template, [""], self.placeholder_id, preprocess=False,
                              max_length=None, compat=self.recipe.compat, warn=False)[0].ids

    def tokenize(self, texts: Sequence[str], template: str, warn: bool = True) -> list[Encoded]:
        """Encode texts inside one of the recipe's templates (placeholders spliced in, long texts truncated)."""
        return encode_prompts(
            self.tokenizer, template, texts, self.placeholder_id,
            preprocess=self.recipe.preprocessing, max_length=self.max_length, compat=self.recipe.compat, warn=warn,
        )

    def tokenize_with_runs(self, texts: Sequence[str], template: str, plan: Plan, warn: bool = True) -> list[Encoded]:
        """:meth:`tokenize`, each row carrying the same sentence in the plan's auxiliary prompts (``Encoded.others``,
        collated alongside as ``Batch.others``)."""
        rows = self.tokenize(texts, template, warn=warn)
        if plan.runs:
            aux = [(name, self.tokenize(texts, t, warn=False)) for name, t in plan.runs]
            rows = [replace(r, others=tuple((name, enc[k]) for name, enc in aux)) for k, r in enumerate(rows)]
        return rows

    def batches(self, rows: Sequence[Encoded], batch_size: int, plan: Plan | None = None, exact_length: bool = False,
                max_tokens: int | None = None):
        """Yield ``(indices, Batch)`` in descending length order (less padding); indices restore the order.

        A batch has at most ``batch_size`` rows and ``max_tokens`` padded positions (default: see
        :mod:`tpsurgery.batching`). ``exact_length``: rows of one length only (no pads; see :mod:`tpsurgery.prefix`).
        """
        plan = plan or self.plan
        for idx in token_batches([len(r.ids) for r in rows], batch_size, max_tokens, exact_length):
            self.stats.count(len(idx), max(len(rows[i].ids) for i in idx), sum(len(rows[i].ids) for i in idx))
            yield idx, collate([rows[i] for i in idx], self.pad_id, plan.reach, indices=idx,
                              hide_placeholders=plan.hide_placeholders, min_length=plan.min_length)

    # -- encode ---------------------------------------------------------------------------------------------------
    def timing(self, sentences: Any) -> contextlib.AbstractContextManager[None]:
        """Counts one call over ``sentences`` in :attr:`stats` (wall time, texts, peak memory), also when it fails;
        ``encode`` and :func:`tpsurgery.sharing.encode_schedules` run inside it."""
        return timed(self.stats, sentences, next(self.model.parameters()).device)

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        show_progress_bar: Any = None,
        normalize_embeddings: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        all_layers: bool = False,
        plan: Plan | None = None,
        max_tokens: int | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Embed one text (1-D result) or a list (``[n, d]``); float32 whatever the model's dtype.

        ``all_layers=True`` returns ``[n, M + 1, d]``: the pooled ``hidden_states[0..M]`` of one pass (M = exit
        layer), for exit-layer sweeps. Duplicate texts are embedded once; batches are length-sorted and hold at most
        ``batch_size`` texts and ``max_tokens`` padded tokens (:mod:`tpsurgery.batching`). With an embedding cache,
        each batch is stored as it finishes (one template; several: at the end of the call), so an interrupted call
        resumes. ``show_progress_bar``: ``None`` (default: a bar only once the call has run 3 s), ``True``, ``False``,
        or a caller's bar (``update(n)``) advanced by the call's texts (:class:`~tpsurgery.batching.Progress`).
        """
        with self.timing(sentences):
            single = isinstance(sentences, str)
            texts = [sentences] if single else check_texts(sentences)
            check_budget(batch_size, max_tokens)
            plan = plan or self.plan
            if not texts:
                d = self.hidden_size
                out = torch.zeros((0, plan.exit_layer + 1, d) if all_layers else (0, d))
            else:
                unique = list(dict.fromkeys(texts))
                where = {t: i for i, t in enumerate(unique)}
                cached, key = self._cached(unique, plan, all_layers)
                todo = [t for t in unique if t not in cached]
                progress = Progress(show_progress_bar, len(texts), 1 / len(self.recipe.templates))
                progress.advance(len(texts) - len(todo), whole=True)  # duplicates and cached texts are done
                store = None
                if key is not None and len(self.recipe.templates) == 1:
                    def store(idx: list[int], values: torch.Tensor) -> None:
                        self._store(key, [todo[i] for i in idx], values)
                try:
                    if todo:
                        per_template = self.per_template(todo, texts, lambda t, cut: self._encode_unique(
                            todo, t, batch_size, progress, all_layers, plan, cut, max_tokens, store,
                            budget_texts=unique))[0]
                        new = torch.stack(per_template).mean(0) if len(per_template) > 1 else per_template[0]
                        bad = non_finite_rows(new)
                        if bad:  # an overflow (float16) must not pass silently; such rows are not cached either
                            warnings.warn(non_finite_message(caller_indices(bad, todo, texts)), UserWarning,
                                          stacklevel=2)
                        if key is not None and store is None:
                            self._store(key, todo, new)
                        cached.update({t: new[i] for i, t in enumerate(todo)})
                finally:
                    progress.close()
                out = torch.stack([torch.as_tensor(cached[t]) for t in unique])
                out = out[torch.tensor([where[t] for t in texts])]
            if normalize_embeddings:
                out = torch.nn.functional.normalize(out, dim=-1)
            if single:
                out = out[0]
            if convert_to_tensor or not convert_to_numpy:
                return out
            return out.numpy()

    def _store(self, key: str, texts: Sequence[str], values: torch.Tensor) -> None:
        """Put the finite rows of ``values`` (one per text) into the embedding cache."""
        ok = torch.isfinite(values.reshape(len(values), -1)).all(1).tolist()
        good = {t: values[j].numpy() for j, t in enumerate(texts) if ok[j]}
        if good:
            self.embedding_cache.put(key, good)

    def save(self, path: Any, texts: str | Sequence[str], embeddings: Any = None, *, store_texts: bool = True,
             **encode_kwargs: Any) -> Any:
        """Write the embeddings of ``texts`` with their provenance to ``path`` (``.npz``; :mod:`tpsurgery.saving`);
        read back with :func:`tpsurgery.load_embeddings`.

        Pass the vectors you already have as ``embeddings=`` (``emb.save(path, texts, embeddings=vectors)``). Without
        it, save encodes ``texts`` again with ``encode_kwargs`` alone: after ``encode(..., normalize_embeddings=True)``
        a bare ``save(path, texts)`` stores unnormalized vectors. The provenance records which
        (``encoded_by_save``, ``normalize_embeddings``: None when given; ``l2_normalized``: what the rows are)."""
        encoded = embeddings is None
        if encoded:
            embeddings = self.encode(texts, **encode_kwargs)
        elif encode_kwargs:
            raise InputError(None, f"save got embeddings= and encode arguments ({', '.join(encode_kwargs)}): the "
                                   "arguments only apply when save encodes the texts itself")
        how = {"encoded_by_save": encoded,
               "normalize_embeddings": bool(encode_kwargs.get("normalize_embeddings", False)) if encoded else None}
        return save_embeddings(path, self, texts, embeddings, store_texts=store_texts, how=how)

    @property
    def dim(self) -> int:
        """The embedding size (the model's hidden size)."""
        return get_path(self.model, self.spec.embed).weight.shape[1]

    @property
    def model_name(self) -> str:
        """The model's Hugging Face id or folder (``name_or_path``), else its class name."""
        return getattr(self.model, "name_or_path", "") or type(self.model).__name__

    def _cached(self, unique: list[str], plan: Plan, all_layers: bool) -> tuple[dict, str | None]:
        """Embeddings already in the on-disk cache, and the cache key (None without a cache)."""
        if self.embedding_cache is None:
            return {}, None
        carried = foreign.check(self.backend)  # hooks or nnsight edits: their effect is no part of any key
        if carried.any:
            warnings.warn(foreign.cache_bypass_message(carried), UserWarning, stacklevel=3)
            return {}, None
        from .cache import model_fingerprint, plan_key, tokenizer_fingerprint

        device = input_device(self.model, self.spec).type
        key = "/".join([model_fingerprint(self.model), tokenizer_fingerprint(self.tokenizer),
                        plan_key(self.recipe, plan, all_layers=all_layers, backend=self.backend.name, device=device)]
                       + ([f"max_length={self.max_length}"] if self.max_length != self.model_max_length else []))
        return self.embedding_cache.get(key, unique), key

    # -- the building blocks of encode (also of tpsurgery.sharing.encode_schedules) --------------------------------
    def per_template(self, todo: list[str], texts: list[str], encode_one, warn: bool = True) -> tuple[list, list]:
        """``encode_one(template, truncated)`` for each template on the distinct texts ``todo``, in eval mode; errors
        name indices of the caller's ``texts``. Returns the results and the caller's indices of truncated texts (one
        warning lists them unless ``warn`` is False)."""
        foreign.check(self.backend)  # not inside a user's nnsight trace; a bridged copy carries nothing foreign
        truncated: set[int] = set()  # indices into todo, filled by encode_rows
        try:
            with eval_mode(self.model):  # a model left in training mode would apply dropout
                out = [encode_one(t, truncated) for t in self.recipe.templates]
        except TpsurgeryError as exc:  # indices of `todo` -> indices of the caller's list
            raise at_user_index(exc, todo, texts) from exc.__cause__
        cut = caller_indices(truncated, todo, texts)
        if cut and warn:
            warnings.warn(truncation_message(cut, self.max_length), UserWarning, stacklevel=3)
        return out, cut

    def _encode_unique(self, texts, template, batch_size, progress, all_layers, plan, truncated, max_tokens=None,
                       on_batch=None, budget_texts=None) -> torch.Tensor:
        d = self.hidden_size
        tail = (plan.exit_layer + 1, d) if all_layers else (d,)

        def run(b, kw):
            if all_layers or len(plan.read_layers) == 1:
                return self.backend.run(plan, b, all_layers=all_layers, **kw)
            layers = self.backend.run(plan, b, all_layers=True, **kw)  # pooled hidden_states[0..M]: pick the reads
            return combine([layers[:, j] for j in plan.read_layers], plan)

        return self.encode_rows(texts, template, batch_size, progress, plan, tail, run, truncated, max_tokens,
                                on_batch, budget_texts)

    def encode_rows(self, texts, template, batch_size, progress, plan, tail, run_batch, truncated, max_tokens=None,
                    on_batch=None, budget_texts=None) -> torch.Tensor:
        """``run_batch(batch, backend_kwargs)`` over length-sorted batches of ``texts`` in ``template`` (one result
        row of shape ``tail`` per text; prompt-prefix reuse, token budgets and out-of-memory splits as in ``encode``);
        rows back in order. Adds the indices of truncated texts to ``truncated``; ``progress`` advances and
        ``on_batch(indices, values)`` is called as each batch finishes."""
        rows = self.tokenize_with_runs(texts, template, plan, warn=False)
        truncated.update(i for i, r in enumerate(rows) if r.truncated)
        prefix = self._prefix(rows, plan)  # the shared prompt prefix's keys/values, or None
        if prefix is not None:
            rows = split_rows(rows, prefix.length)
        run_kw = {"prefix": prefix} if prefix is not None else {}
        if max_tokens is None and budget_texts is not None and len(budget_texts) != len(texts):
            # a resumed call (some texts were cached): the token budget of the whole call, so the batches left to run
            # are composed exactly as in an uninterrupted run (bitwise-identical results), not by what is left
            cut = prefix.length if prefix is not None else 0
            max_tokens = default_budget([len(r.ids) - cut for r in self.tokenize(budget_texts, template, warn=False)],
                                        batch_size)
        buckets = prefix is not None and prefix.needs_buckets(max(len(r.ids) for r in rows))  # sliding windows
        out = torch.empty((len(texts), *tail), dtype=torch.float32)
        oom: dict = {}  # out-of-memory splits: the batch size that fits (tpsurgery.resources)
        pending: list = []  # accelerator results not yet copied back: one copy (one sync) per PENDING_BYTES
        for idx, batch in self.batches(rows, batch_size, plan, exact_length=buckets, max_tokens=max_tokens):
            if plan.pooling == "mean":
                empty = (batch.text_mask.sum(1) == 0).nonzero()
                if len(empty):
                    raise InputError(idx[int(empty[0, 0])], "mean pooling needs at least one sentence token")

            def run(part: list[int], whole=batch, idx=idx):  # a half of the batch is collated like the batch
                b = whole if part == idx else collate([rows[i] for i in part], self.pad_id, plan.reach, indices=part,
                                                      hide_placeholders=plan.hide_placeholders,
                                                      min_length=plan.min_length)
                return run_batch(b, run_kw)

            values = run_splitting(run, idx, oom)
            if on_batch is not None:  # the per-batch store needs this batch's values on the host now
                values = values.cpu()
                on_batch(idx, values)
            pending.append((idx, values))
            if values.device.type == "cpu" or sum(t.numel() for _, t in pending) * 4 > PENDING_BYTES:
                flush_results(out, pending)
            progress.advance(len(idx))
        flush_results(out, pending)
        return out

    def _prefix(self, rows: Sequence[Encoded], plan: Plan) -> Prefix | None:
        """Prompt-prefix reuse where it is exact: on, a backend that takes a cache, and as far as the plan allows
        (:meth:`Plan.prefix_limit <tpsurgery.plan.Plan.prefix_limit>`: no edit or read before it)."""
        enabled = self.prefix_cache
        if enabled is None:  # auto: measured to pay on the CPU, not on a GPU (docs/performance.md)
            enabled = input_device(self.model, self.spec).type == "cpu"
        if not (enabled and self.backend.supports_prefix and plan.prefix_reusable) or foreign.check(self.backend).any:
            return None  # (the prefix is computed by a plain forward: without nnsight edits, hooks on other rows)
        n = shared_prefix_length(rows, plan)
        prefix = self._prefixes.get(rows[0].ids[:n]) if n > 0 else None
        if prefix is not None:
            self.stats.prefix_tokens_saved += n * len(rows)
        return prefix

    # -- your own trace (tpsurgery.compose) ----------------------------------------------------------------------
    def trace(self, texts: str | Sequence[str], template: int | None = None) -> Any:
        """``with emb.trace(texts) as run:`` an nnsight trace of the model on ``texts`` in the recipe's prompt with
        the recipe's edits in it: save or edit envoy values (``run.layers[i].output``, ``run.hidden_state(j)``)
        beside them; after the block ``run.embeddings`` equals ``encode(texts)``. See :mod:`tpsurgery.compose`."""
        return compose.trace(self, texts, template)

    def hooks(self, texts: str | Sequence[str], template: int | None = None) -> compose.HookRun:
        """TransformerLens backend: the recipe on ``texts`` as ``run.fwd_hooks`` for ``bridge.run_with_hooks(
        **run.inputs, fwd_hooks=...)``; then ``run.embeddings``. See :mod:`tpsurgery.compose`."""
        return compose.hooks(self, texts, template)

    # -- explain ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Undo what the backend left on the model object (nnsight's forward wrappers); ``encode`` still works after.

        ``with tpsurgery.apply(model, recipe) as emb: ...`` closes on exit, also on exceptions.
        """
        self.backend.close()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def explain(self, text: str) -> str:
        """The token sequence with placeholders marked, their positions, the layer schedule and the exit layer."""
        lines = [f"recipe: {self.recipe.name or '(unnamed)'}  [{self.recipe.hash()}]",
                 f"model: {type(self.model).__name__}, {self.n_layers} decoder layers, backend {self.backend.name}"]
        for k, template in enumerate(self.recipe.templates):
            row = self.tokenize([text], template)[0]
            toks = self.tokenizer.convert_ids_to_tokens(list(row.ids))
            shown = []
            for i, t in enumerate(toks):
                t = f"[<PST>#{i}]" if i in row.placeholders else t
                if i == row.text_span[0]:
                    shown.append("{")
                shown.append(t)
                if i == row.text_span[1] - 1:
                    shown.append("}")
            lines.append(f"template {k}: {len(row.ids)} tokens{' (truncated)' if row.truncated else ''}")
            lines.append("  " + " ".join(shown))
            lines.append(f"  placeholder positions: {list(row.placeholders)} (token id {self.placeholder_id}); "
                         f"sentence tokens: [{row.text_span[0]}, {row.text_span[1]}); source: position "
                         f"{len(row.ids) + self.recipe.tp.source}")
        init = self.recipe.placeholder.init
        lines.append(f"placeholder init: {init}" + (f" (embedding row of token {self.placeholder_id})" if init == "token" else ""))
        lines.append(self.plan.describe())
        k = f" (k = {self.plan.pool_k})" if self.plan.pooling == "last_k" else ""
        lines.append(f"pooling: {self.plan.pooling}{k}")
        return "\n".join(lines)

