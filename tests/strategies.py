"""Hypothesis strategies for the property suite: recipes (whole schema, or valid for a model depth), sentences,
batch compositions.

Recipes are drawn as plain mappings (what a user writes in YAML) and validated by ``parse_recipe`` in the tests.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

from tpsurgery.testing import ARCHS, VOCAB

MASKS_LANDED = (Path(__file__).resolve().parents[1] / "tpsurgery" / "masks.py").exists()

# ---------------------------------------------------------------------------------------------------- sentences
EDGE_SENTENCES = (
    "", " ", "a", ".", "?", '"', "'", "hello world", 'She said "no"?', "  leading and trailing  ",
    "日本語の文です", "你好，世界", "한국어 문장", "مرحبا بالعالم", "שלום עולם", "עברית mixed with English",
    "🎉🎉 emoji 👩‍👩‍👧‍👦 family", "🇫🇷", "e\u0301 combining", "zero\u200bwidth", "\ufeffBOM", "tab\there", "new\nline",
    "cr\rlf\r\n", "nul\x00byte", "\x07\x1b[31mescape", "\u202eRTL override", "a" * 40,
    "<eos>", "x<bos>y<pad>", "a <PST> inside", "{text}",  # user text is ordinary text, never special
)

_ALPHABETS = st.sampled_from([
    st.characters(codec="utf-8"),  # anything encodable (no surrogates)
    st.characters(min_codepoint=32, max_codepoint=126),
    st.characters(categories=["Lo"]),  # CJK, Arabic, Hebrew, ...
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.characters(categories=["Cc", "Cf", "Zs", "Mn"]),  # control, format, spaces, combining
])


@st.composite
def sentences(draw, long: bool = True) -> str:
    """One sentence: an edge case, random unicode, or (``long``) one past the tiny models' 512-token limit."""
    kind = draw(st.sampled_from(["edge", "text", "text", "long"] if long else ["edge", "text", "text"]))
    if kind == "edge":
        s = draw(st.sampled_from(EDGE_SENTENCES))
    elif kind == "text":
        s = draw(st.text(draw(_ALPHABETS), max_size=24))
    else:
        unit = draw(st.text(draw(_ALPHABETS), min_size=1, max_size=6))
        s = unit * (600 // len(unit.encode()) + 1)
    return s


def sentence_lists(min_size: int = 1, max_size: int = 6, long: bool = True):
    """A list of sentences, duplicates allowed (the embedder de-duplicates)."""
    return st.lists(sentences(long=long), min_size=min_size, max_size=max_size)


def batch_sizes():
    return st.integers(1, 7)


# ------------------------------------------------------------------------------------------------------ prompts
_LITERAL = st.text(st.sampled_from(list("abc xyz:\"'.,") + ["é", "語"]), max_size=8)


@st.composite
def templates(draw, markers: bool = True, min_markers: int = 0) -> str:
    """A template: literal pieces, 1-2 ``{text}`` slots, 0-2 ``<PST>`` markers (adjacent / at the ends allowed)."""
    n_slots = draw(st.integers(1, 2))
    n_markers = draw(st.integers(min_markers, 2)) if markers else 0
    tokens = ["{text}"] * n_slots + ["<PST> " if draw(st.booleans()) else "<PST>" for _ in range(n_markers)]
    order = draw(st.permutations(tokens))
    out = draw(_LITERAL)
    for t in order:
        out += t + draw(_LITERAL)
    return out


# ------------------------------------------------------------------------------------------------------ recipes
@st.composite
def _spans(draw, n_layers: int, max_spans: int = 2):
    cuts = sorted(draw(st.lists(st.integers(0, n_layers), min_size=0, max_size=2 * max_spans, unique=True)))
    return [{"start": a, "stop": b} for a, b in zip(cuts[::2], cuts[1::2])]


ROW_SELECTORS = ("last", -1, 0, "all", "sentence", "prompt", [0, -1], {"start": -1, "stop": 0})
RUN_ROWS = ("last", -1, [-1])  # an auxiliary run's rows: counted from the end


@st.composite
def surgery_sections(draw, n_layers: int, has_marker: bool, max_edits: int = 3) -> dict:
    """A random ``runs`` + ``edits`` section (issue 12): row ops drawn from the op registry (``tpsurgery.ops.OPS``:
    every op with a tensor function, with one of its example parameter sets, numbers sometimes redrawn), at every row
    site, on every kind of row selector. A new op is drawn the day it is registered."""
    from tpsurgery.ops import OPS

    out: dict = {}
    if draw(st.booleans()):
        out["runs"] = {"aux": "q" + draw(templates(markers=False))}
    edits = []
    for _ in range(draw(st.integers(1, max_edits))):
        site = draw(st.sampled_from(["embed", "layer_in", "attn_out_in", "layer_out"]))
        op = draw(st.sampled_from(sorted(n for n, o in OPS.items() if o.fn is not None and site in o.sites)))
        params = dict(draw(st.sampled_from([p for p in OPS[op].examples if "run" not in p or "runs" in out])))
        e: dict = {"site": site, "op": op, **params}
        if site != "embed":
            e["layers"] = draw(st.integers(0, n_layers - 1) | st.lists(st.integers(0, n_layers - 1), min_size=1,
                                                                        max_size=2, unique=True))
        rows = RUN_ROWS if "run" in e else ROW_SELECTORS + (("placeholders",) if has_marker else ())
        e["rows"] = draw(st.sampled_from(rows))
        if site == "attn_out_in" and draw(st.booleans()):
            e["heads"] = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
        if "seed" in e:
            e["seed"] = draw(st.integers(0, 99))
        if "alpha" in e or (op == "copy" and draw(st.booleans())):
            e["alpha"] = draw(st.sampled_from([1.0, 0.5]) | st.floats(0, 1))
        if "factor" in e and draw(st.booleans()):
            e["factor"] = draw(st.floats(-3, 3))
        edits.append(e)
    out["edits"] = edits
    return out


@st.composite
def engine_recipes(draw, n_layers: int = 4, masks: bool | None = None, pooling=None, edits: bool = False,
                   surgery: bool = False):
    """A recipe mapping valid for a model with ``n_layers`` decoder layers and the tiny 260-token vocabulary.

    ``masks``: also draw attention edits (placeholder.mask first_layer, attention.bidirectional); default: only when
    tpsurgery/masks.py exists. ``edits``: always a placeholder and an attention edit (for the mask properties).
    ``surgery``: half of the recipes also carry a random ``runs`` / ``edits`` section (:func:`surgery_sections`).
    """
    masks = MASKS_LANDED if masks is None else masks
    many = draw(st.integers(1, 5)) == 1
    if edits:
        prompt = draw(templates(min_markers=1))
    elif many:
        prompt = draw(st.lists(templates(), min_size=2, max_size=2))
    else:
        prompt = draw(st.one_of(st.none(), templates()))
    tmpl = prompt if isinstance(prompt, list) else [prompt] if prompt else []
    has_marker = any("<PST>" in t for t in tmpl)
    r: dict = {"prompt": prompt}
    if draw(st.booleans()):
        r["preprocess"] = draw(st.booleans())
    r["exit_layer"] = draw(st.integers(-(n_layers + 1), n_layers))
    r["pooling"] = draw(pooling if pooling is not None else st.sampled_from(["last", "mean"]))
    r["compat"] = draw(st.sampled_from(["exact", "official"]))
    if has_marker:
        spans = draw(_spans(n_layers))
        tp: dict = {"spans": spans}
        if draw(st.integers(0, 4)) == 0:
            last = max((s["stop"] for s in spans), default=0)
            if last < n_layers:
                tp["resume"] = draw(st.integers(last, n_layers - 1))
        tp["alpha"] = draw(st.sampled_from([1.0, 1.0, 0.25, 0.0]) | st.floats(0, 1))
        tp["source"] = draw(st.sampled_from([-1, -1, -2, -3]))
        r["tp"] = tp
        ph: dict = {"init": draw(st.sampled_from(["token", "token", "zeros", "ones", "uniform", "gaussian"]))}
        ph["token_id"] = draw(st.sampled_from([0, 256, 258]) | st.integers(0, VOCAB - 1))
        if ph["init"] == "gaussian":
            ph["seed"] = draw(st.integers(0, 2**16))
            ph["mean"] = draw(st.floats(-1, 1))
            ph["std"] = draw(st.floats(0.01, 2))
        ph["mask"] = draw(st.sampled_from(["none", "all", "first_layer"] if masks else ["none", "all"]))
        if edits and ph["mask"] == "all":
            ph["mask"] = "first_layer"
        r["placeholder"] = ph
        if masks and (edits or draw(st.booleans())):
            att: dict = {"bidirectional": draw(st.sampled_from(["last_token", "sentence"] if edits else
                                                               ["none", "last_token", "sentence"]))}
            if draw(st.booleans()):
                a, b = sorted(draw(st.lists(st.integers(0, n_layers), min_size=2, max_size=2, unique=True)))
                att["layers"] = {"start": a, "stop": b}
            r["attention"] = att
    if surgery and draw(st.booleans()):
        r.update(draw(surgery_sections(n_layers, has_marker and not many)))
    return r


def causal(recipe: dict) -> bool:
    return recipe.get("attention", {}).get("bidirectional", "none") == "none" and \
        recipe.get("placeholder", {}).get("mask", "none") == "none"


def archs():
    return st.sampled_from(ARCHS)


# ---------------------------------------------------------------------------------------------- schema recipes
_NAME = st.text(max_size=12)
_FLOAT01 = st.floats(0, 1, allow_nan=False)


@st.composite
def schema_recipes(draw):
    """Any recipe the schema accepts (no model-depth constraint): for round-trip and validation properties."""
    r = draw(engine_recipes(n_layers=draw(st.integers(1, 64)), masks=True))
    if draw(st.booleans()):
        r["name"] = draw(_NAME)
        r["description"] = draw(st.text(max_size=40))
    if draw(st.integers(0, 5)) == 0:
        r["exit_layer"] = "auto"
    if draw(st.booleans()) and "placeholder" in r:
        r["placeholder"]["token"] = draw(st.text(min_size=1, max_size=4))
    if draw(st.booleans()):
        r.pop("compat", None)  # defaults too
    return r


# Invalid edits: (dotted path, bad value, the field the error must name)
INVALID_EDITS = [
    ("exit_layer", "last", "exit_layer"),
    ("exit_layer", 1.5, "exit_layer"),
    ("pooling", "max", "pooling"),
    ("compat", "loose", "compat"),
    ("preprocess", "sometimes", "preprocess"),
    ("prompt", "no slot here", "prompt"),
    ("prompt", [], "prompt"),
    ("prompt", 7, "prompt"),
    ("tp.alpha", 1.5, "tp.alpha"),
    ("tp.alpha", -0.1, "tp.alpha"),
    ("tp.source", 0, "tp.source"),
    ("tp.resume", -1, "tp.resume"),
    ("tp.spans", [{"start": 2, "stop": 2}], "tp.spans.0"),
    ("tp.spans", [{"start": -1, "stop": 2}], "tp.spans.0.start"),
    ("tp.spans", [{"start": 0, "stop": 3}, {"start": 2, "stop": 4}], "tp"),
    ("tp.spans", [{"start": 0, "stop": 2, "extra": 1}], "tp.spans.0.extra"),
    ("placeholder.init", "random", "placeholder.init"),
    ("placeholder.std", 0.0, "placeholder.std"),
    ("placeholder.token_id", -3, "placeholder.token_id"),
    ("placeholder.mask", "yes", "placeholder.mask"),
    ("attention.bidirectional", "full", "attention.bidirectional"),
    ("attention.layers", {"start": 3, "stop": 1}, "attention.layers"),
    ("unknown_key", 1, "unknown_key"),
    ("tp.unknown", 1, "tp.unknown"),
]


def scaled(fraction: float):
    """``@settings`` with a share of the active profile's max_examples (ci: 100, dev: 1000), so dev digs deeper too."""
    from hypothesis import settings

    return settings(max_examples=max(3, round(settings.default.max_examples * fraction)))
