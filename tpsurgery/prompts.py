"""Prompt templates -> token sequences with placeholder positions and the sentence's token span.

>>> from tpsurgery.prompts import preprocess_sentence, split_template
>>> preprocess_sentence('He said "no"?')
"He said 'no'."
>>> split_template('This sentence : <PST> "{text}" means in one word:"')
('This sentence : ', '<PST>', '"', '{text}', '" means in one word:"')
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import InputError, ModelError, RecipeError
from .recipe import PLACEHOLDER_MARKER, TEXT_SLOT

_PIECES = re.compile(f"({re.escape(PLACEHOLDER_MARKER)} ?|{re.escape(TEXT_SLOT)})")


def preprocess_sentence(s: str) -> str:
    """The reference preprocessing: end with . ? " or ' (else append '.'), " -> ', trailing ? -> '.'."""
    if s and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if s and s[-1] == "?":
        s = s[:-1] + "."
    return s


def split_template(template: str, *, drop_space: bool = True) -> tuple[str, ...]:
    """Literal pieces, ``<PST>`` markers (one following space dropped) and ``{text}`` slots, in order."""
    out = []
    for piece in _PIECES.split(template):
        if piece.startswith(PLACEHOLDER_MARKER):
            out.append(PLACEHOLDER_MARKER)
            if not drop_space and piece != PLACEHOLDER_MARKER:
                out.append(piece[len(PLACEHOLDER_MARKER):])
        elif piece:
            out.append(piece)
    return tuple(out)


@dataclass(frozen=True)
class Encoded:
    """One prompted sentence: token ids, the placeholder indices in them, and the last ``{text}`` slot's tokens.

    ``others``: the same sentence in auxiliary prompts, ``(run name, Encoded)`` (see ``runs`` in recipes).
    """

    ids: tuple[int, ...]
    placeholders: tuple[int, ...]
    text_span: tuple[int, int]
    truncated: bool = False
    others: tuple[tuple[str, "Encoded"], ...] = ()


def _fill(pieces: Sequence[str], text: str) -> tuple[str, list[int], tuple[int, int]]:
    """The marker-free string, the character position of each marker, and the last text slot's char range."""
    buf, markers, span, pos = [], [], (0, 0), 0
    for piece in pieces:
        if piece == PLACEHOLDER_MARKER:
            markers.append(pos)
            continue
        chunk = text if piece == TEXT_SLOT else piece
        if piece == TEXT_SLOT:
            span = (pos, pos + len(chunk))
        buf.append(chunk)
        pos += len(chunk)
    return "".join(buf), markers, span


def _splice(ids, offsets, markers, span, placeholder_id) -> Encoded:
    out_ids: list[int] = []
    placeholders: list[int] = []
    text_tokens: list[int] = []
    pending = sorted(markers)
    for tok, (s, e) in zip(ids, offsets):
        is_special = s == e
        while pending and not is_special and e > pending[0]:
            placeholders.append(len(out_ids))
            out_ids.append(placeholder_id)
            pending.pop(0)
        if not is_special and s < span[1] and e > span[0]:
            text_tokens.append(len(out_ids))
        out_ids.append(tok)
    for _ in pending:  # markers at the very end of the template
        placeholders.append(len(out_ids))
        out_ids.append(placeholder_id)
    text_span = (text_tokens[0], text_tokens[-1] + 1) if text_tokens else (len(out_ids), len(out_ids))
    return Encoded(tuple(out_ids), tuple(placeholders), text_span)


def encode_prompts(
    tokenizer: Any,
    template: str,
    texts: Sequence[str],
    placeholder_id: int,
    *,
    preprocess: bool,
    max_length: int | None = None,
    compat: str = "exact",
    warn: bool = True,
) -> list[Encoded]:
    """Tokenize ``texts`` inside ``template``: one placeholder token at each marker's token boundary.

    ``compat="exact"``: the sequence is the marker-free prompt's tokenization plus one token per marker.
    ``compat="official"``: like the reference code, which adds ``<PST>`` to the vocabulary: the pieces between markers
    are tokenized separately (on byte-level BPE this leaves a lone-space token before the placeholder).

    User text is ordinary text: a ``<PST>`` or a special token's text in it (``<|endoftext|>``) is split into ordinary
    tokens, never turned into a placeholder or a special token. Rows longer than ``max_length`` are truncated (the
    sentence is cut, the prompt kept) with one warning per call (``warn``) naming how many inputs were cut.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("tpsurgery needs a fast (Rust) tokenizer with offset mappings; got a slow tokenizer")
    texts = [preprocess_sentence(t) if preprocess else t for t in texts]
    if max_length is not None:  # a 1 MB line is cut by characters first: only a prefix can ever be kept
        bound = char_bound(tokenizer, max_length)
        texts = [t[:bound] if len(t) > bound else t for t in texts]
    tok = _Tokenize(tokenizer, template)
    if compat == "official":
        encode = functools.partial(_encode_official, tok, _chunks(template), placeholder_id, {})
    else:
        encode = functools.partial(_encode_exact, tok, split_template(template), placeholder_id)
    out = []
    for i, (text, (count, build, raw)) in enumerate(zip(texts, encode(texts, True))):  # tokenized once, one batch
        out.append(build() if max_length is None or count <= max_length
                   else _truncate(encode, text, count, raw, max_length, i))
    cut = [i for i, e in enumerate(out) if e.truncated]
    if cut and warn:
        warnings.warn(truncation_message(cut, max_length), UserWarning, stacklevel=3)
    return out


_LONGEST: dict[int, tuple[Any, int]] = {}


def char_bound(tokenizer: Any, max_length: int) -> int:
    """A number of characters whose every prefix-of-a-text beyond it needs more than ``max_length`` tokens: no token
    spans more characters than the longest vocabulary entry (``L``; 4 L with a normalizer, which may fold characters),
    so ``(max_length + 2) * L`` characters take at least ``max_length + 2`` tokens. Cutting a text there before
    tokenizing changes no truncation result (the kept prefix is at most ``max_length`` tokens) and bounds the work of
    a 1 MB line.

    >>> from tpsurgery.testing import tiny_model
    >>> tok = tiny_model("llama")[1]
    >>> char_bound(tok, 10) in (12 * max(len(t) for t in tok.get_vocab()), 48 * max(len(t) for t in tok.get_vocab()))
    True
    """
    hit = _LONGEST.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.normalizer is not None:  # normalization may fold several characters into one
            longest *= 4
        hit = (tokenizer, longest)
        _LONGEST[id(tokenizer)] = hit
    return (max_length + 2) * max(1, hit[1])


def check_markers(tokenizer: Any, template: str, field: str = "prompt") -> None:
    """Refuse a ``<PST>`` written inside a word: exact mode would put the placeholder before the whole token.

    >>> from tpsurgery.testing import tiny_tokenizer
    >>> check_markers(tiny_tokenizer(), 'This sent<PST>ence "{text}"')  # byte tokens: every marker is on a boundary
    """
    filled, markers, _ = _fill(split_template(template), "x")
    enc = _Tokenize(tokenizer, template)([filled])
    for m in markers:
        for a, b in enc["offset_mapping"][0]:
            if a < m < b and filled[a:m].strip():
                raise RecipeError(field, f"the {PLACEHOLDER_MARKER} marker in {template!r} splits the token "
                                         f"{filled[a:b]!r} ({filled[a:m]!r} + {filled[m:b]!r}), so the placeholder "
                                         "would go before the whole token; put the marker next to a space or "
                                         "punctuation, or use compat: official")


def truncation_message(indices: Sequence[int], max_length: int | None) -> str:
    """The one warning of a call that truncated ``indices``."""
    shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
    return (f"{len(indices)} input(s) truncated to the model's limit of {max_length} tokens "
            f"(the end of the sentence is dropped; inputs {shown})")


class _Tokenize:
    """The tokenizer call used for prompts: user text never yields special tokens (no prompt injection).

    Special tokens written in the template itself (chat markers) stay special; then the text span is checked instead.
    """

    def __init__(self, tokenizer: Any, template: str):
        self.tokenizer = tokenizer
        # The named special tokens and every added token flagged special: the tokenizer parses all of them as one
        # special token (transformers 5.17's GGUF conversion names only <|im_start|> and <|endoftext|> for SmolLM2,
        # yet <|im_end|> stays a special added token).
        added = {i: str(t) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                 if getattr(t, "special", False)}
        specials = [str(t) for t in getattr(tokenizer, "all_special_tokens", ()) if str(t)] + list(added.values())
        literal = "".join(p for p in split_template(template) if p not in (PLACEHOLDER_MARKER, TEXT_SLOT))
        self.template_has_specials = any(t in literal for t in specials if t)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", ())) | set(added)

    def __call__(self, strings: list[str], add_special_tokens: bool = True) -> Any:
        return self.tokenizer(strings, return_offsets_mapping=True, add_special_tokens=add_special_tokens,
                              split_special_tokens=not self.template_has_specials)

    def check_text(self, ids, offsets, spans, index) -> None:
        """With special tokens in the template, a special token inside the user text (any of its ``{text}`` slots'
        character ``spans``) is refused (InputError)."""
        if not self.template_has_specials:
            return
        for tok, (s, e) in zip(ids, offsets):
            if tok in self.special_ids and s < e and any(s < b and e > a for a, b in spans):
                name = self.tokenizer.convert_ids_to_tokens(tok)
                raise InputError(index, f"the text contains the special token {name!r}; the template uses special "
                                        "tokens too, so it cannot be split off safely")


def _slot_starts(pieces: Sequence[str], n: int) -> list[int]:
    """Where each ``{text}`` slot starts in the marker-free string ``_fill(pieces, text)`` of a text of ``n`` chars."""
    starts, pos = [], 0
    for piece in pieces:
        if piece == TEXT_SLOT:
            starts.append(pos)
        pos += n if piece == TEXT_SLOT else 0 if piece == PLACEHOLDER_MARKER else len(piece)
    return starts


def _encode_exact(tokenizer, pieces, placeholder_id, texts, check):
    """Per text, from one tokenizer call: ``(token count, build, raw)``; ``build()`` makes the ``Encoded`` (skipped
    for a text cut anyway), ``raw`` is ``[(offsets, slot starts)]``. ``check``: refuse special tokens in user text
    (``_Tokenize.check_text``), text by text as they are yielded."""
    filled = [_fill(pieces, t) for t in texts]
    enc = tokenizer([f[0] for f in filled]) if texts else {"input_ids": [], "offset_mapping": []}
    for i, (text, (_, markers, span)) in enumerate(zip(texts, filled)):
        ids, offsets = enc["input_ids"][i], enc["offset_mapping"][i]
        if check:
            tokenizer.check_text(ids, offsets, [(a, a + len(text)) for a in _slot_starts(pieces, len(text))], i)
        yield (len(ids) + len(markers), functools.partial(_splice, ids, offsets, markers, span, placeholder_id),
               [(offsets, _slot_starts(pieces, len(text)))])


def _chunks(template: str) -> list[list[str]]:
    """compat=official: the template's pieces between ``<PST>`` markers (tokenized separately)."""
    chunks: list[list[str]] = [[]]
    for p in split_template(template, drop_space=False):
        if p == PLACEHOLDER_MARKER:
            chunks.append([])
        else:
            chunks[-1].append(p)
    return chunks


def _encode_official(tokenizer, chunks, placeholder_id, cache, texts, check):
    """Like ``_encode_exact`` for compat=official: one tokenizer call per chunk holding ``{text}`` (the others are
    tokenized once per ``cache``); the first chunk carries the BOS, even when empty."""
    encs = []
    for k, chunk in enumerate(chunks):
        if TEXT_SLOT in chunk:
            encs.append(tokenizer([_fill(chunk, t)[0] for t in texts], add_special_tokens=(k == 0)) if texts else None)
        else:
            if k not in cache:
                cache[k] = tokenizer([_fill(chunk, "")[0]], add_special_tokens=(k == 0))
            encs.append(cache[k])
    for i, text in enumerate(texts):
        js = [i if TEXT_SLOT in chunk else 0 for chunk in chunks]  # a chunk without {text} is tokenized once
        rows = [(enc["input_ids"][j], enc["offset_mapping"][j]) for j, enc in zip(js, encs)]
        if check:  # user text never carries a special token (see _Tokenize)
            for chunk, (ids, offsets) in zip(chunks, rows):
                if TEXT_SLOT in chunk:
                    tokenizer.check_text(ids, offsets, [(a, a + len(text)) for a in _slot_starts(chunk, len(text))], i)
        yield (sum(len(ids) for ids, _ in rows) + len(chunks) - 1,
               functools.partial(_join_official, chunks, rows, text, placeholder_id),
               [(offsets, _slot_starts(chunk, len(text))) for chunk, (_, offsets) in zip(chunks, rows)
                if TEXT_SLOT in chunk])


def _join_official(chunks, rows, text, placeholder_id) -> Encoded:
    ids: list[int] = []
    placeholders: list[int] = []
    text_tokens: list[int] = []
    for k, (chunk, (tok_ids, offsets)) in enumerate(zip(chunks, rows)):
        if k > 0:
            placeholders.append(len(ids))
            ids.append(placeholder_id)
        if TEXT_SLOT in chunk:  # the sentence span is the LAST {text} slot's tokens (as in exact mode)
            span = _fill(chunk, text)[2]
            text_tokens = [len(ids) + q for q, (a, b) in enumerate(offsets) if a != b and a < span[1] and b > span[0]]
        ids.extend(tok_ids)
    text_span = (text_tokens[0], text_tokens[-1] + 1) if text_tokens else (len(ids), len(ids))
    return Encoded(tuple(ids), tuple(placeholders), text_span)


def _truncate(encode, text, count, raw, max_length, index) -> Encoded:
    """The longest character prefix of ``text`` whose prompt fits ``max_length`` tokens, found as the binary search
    over cuts 0..len(text) finds it (every ``{text}`` slot shrinks with the cut: echo prompts have two), but with
    the tokenizer called only for its probes near the cut guessed from the whole text's token offsets (``raw``):
    typically one batch (see ``_longest_fit``)."""
    guess, width = _guess(raw, len(text), count - max_length)
    seen = {}

    def fits(cuts: list[int]) -> list[bool]:
        for c, (k, build, _) in zip(cuts, encode([text[:c] for c in cuts], False)):
            seen[c] = (k, build)
        return [seen[c][0] <= max_length for c in cuts]

    cut = _longest_fit(fits, len(text), guess, width)
    if cut == 0:
        raise InputError(index, f"the prompt alone is longer than the model's limit of {max_length} tokens")
    e = seen[cut][1]()
    return Encoded(e.ids, e.placeholders, e.text_span, truncated=True)


def _guess(raw, n: int, over: int) -> tuple[int, int]:
    """The cut that drops ``over`` tokens if every prefix tokenized like the whole text (dropping, in each slot, the
    tokens that start at or after the cut), and a search width: 4 x the characters per token, at least 16."""
    starts = sorted(a - s for offsets, slots in raw for s in slots for a, b in offsets if a < b and s <= a < s + n)
    width = max(16, 4 * -(-n * sum(len(slots) for _, slots in raw) // max(1, len(starts))))
    return (starts[len(starts) - over] if 0 < over <= len(starts) else 0), width


def _longest_fit(fits: Callable[[list[int]], list[bool]], n: int, guess: int, width: int) -> int:
    """The ``lo`` that the binary search for the largest fitting cut in 0..n ends with, calling ``fits`` (in batches)
    only for the cuts it probes within ``width`` of ``guess``: a farther probe is taken to fit iff it is at most
    ``guess``. An answer more than ``width / 2`` from the guess becomes the next guess, with 4 x the width (at
    ``width >= n`` every probe is real: the plain binary search). So the answer is the binary search's whenever each
    cut farther than ``width / 2`` from the answer fits iff it is below the answer; nearer, fitting may go up and
    down (BPE merges: a word's prefix can take more tokens than the word).

    >>> calls = []
    >>> def fits(cuts):
    ...     calls.append(cuts)
    ...     return [c <= 700 or c == 705 for c in cuts]  # 705 fits again (a BPE merge), yet the answer is 700
    >>> _longest_fit(fits, 1000, 700, 16), calls  # a good guess: one batch, the probes the binary search makes
    (700, [[687, 702, 694, 698, 700, 701]])
    >>> calls.clear()
    >>> _longest_fit(fits, 1000, 680, 16), len(calls)  # 20 off: the window moves, each batch a step of the search
    (700, 6)
    """
    known: dict[int, bool] = {}
    while True:
        lo, hi, need = 0, n, []
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ok = known.get(mid)
            if ok is None:
                if abs(mid - guess) <= width:
                    need.append(mid)
                ok = mid <= guess
            lo, hi = (mid, hi) if ok else (lo, mid - 1)
        if need:
            known.update(zip(need, fits(need)))
        elif 2 * abs(lo - guess) <= width or width >= n:
            return lo
        else:
            guess, width = lo, 4 * width
