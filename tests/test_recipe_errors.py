"""Malformed recipes: every one ends in a RecipeError whose message names the offending field (no raw tracebacks).

Cases marked ``model`` are only wrong for a particular model (the tiny 4-layer Llama, vocabulary 260), so they go
through ``tpsurgery.apply``; the others are wrong whatever the model and go through ``parse_recipe``.
"""

from __future__ import annotations

import warnings

import pytest
from typer.testing import CliRunner

import tpsurgery
from tpsurgery.cli import app
from tpsurgery.testing import tiny_model

P = 'This sentence : <PST> "{text}" means in one word:"'
TP = {"start": 0, "stop": 1}


def _bomb() -> str:
    """A 1 kB YAML whose aliases expand to 9**9 strings (the "billion laughs" attack)."""
    text = 'prompt: &a ["x","x","x","x","x","x","x","x","x"]\n'
    prev = "a"
    for i in range(1, 9):
        text += f"l{i}: &l{i} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = f"l{i}"
    return text


# (id, recipe source (dict or YAML text), needs the model, field the error must name, a fragment of the message)
CASES = [
    # unknown keys, at every level
    ("unknown-top-key", {"promt": "x {text}"}, False, "promt", "unknown key; did you mean `prompt`? (allowed here: name,"),
    ("unknown-tp-key", {"prompt": P, "tp": {**TP, "alpah": 0.5}}, False, "tp.alpah", "allowed here: spans, resume"),
    ("unknown-placeholder-key", {"prompt": P, "placeholder": {"tokenid": 3}}, False, "placeholder.tokenid", "unknown"),
    ("unknown-span-key", {"prompt": P, "tp": {"spans": [{**TP, "step": 1}]}}, False, "tp.spans.0.step", "unknown"),
    # wrong types
    ("prompt-int", {"prompt": 5}, False, "prompt", "valid string"),
    ("prompt-list-item-int", {"prompt": [P, 3]}, False, "prompt.1", "valid string"),
    ("prompt-empty-list", {"prompt": []}, False, "prompt", "at least one template"),
    ("exit-layer-word", "exit_layer: last", False, "exit_layer", "'auto'"),
    ("exit-layer-float", {"exit_layer": 2.5}, False, "exit_layer", "fractional part"),
    ("exit-layer-yaml-yes", "exit_layer: yes", False, "exit_layer", "boolean"),
    ("start-word", {"prompt": P, "tp": {"start": "one", "stop": 2}}, False, "tp.spans.0.start", "valid integer"),
    ("stop-bool", {"prompt": P, "tp": {"start": 0, "stop": True}}, False, "tp.spans.0.stop", "boolean"),
    ("alpha-word", {"prompt": P, "tp": {**TP, "alpha": "half"}}, False, "tp.alpha", "valid number"),
    ("tp-int", {"prompt": P, "tp": 3}, False, "tp", "valid dictionary"),
    ("spans-mapping", {"prompt": P, "tp": {"spans": {"start": 0, "stop": 1}}}, False, "tp.spans", "valid tuple"),
    ("name-int", {"name": 3}, False, "name", "valid string"),
    ("preprocess-word", {"preprocess": "sometimes"}, False, "preprocess", "valid boolean"),
    # templates
    ("template-without-text", {"prompt": "hello <PST>"}, False, "prompt", "no {text} slot"),
    ("list-template-without-text", {"prompt": [P, "no slot"]}, False, "prompt.1", "no {text} slot"),
    ("tp-without-marker", {"prompt": "say {text}", "tp": TP}, False, "tp", "<PST> marker"),
    ("mask-without-marker", {"prompt": "{text}", "placeholder": {"mask": "all"}}, False, "placeholder.mask", "<PST>"),
    ("bidir-without-marker", {"prompt": "{text}", "attention": {"bidirectional": "sentence"}}, False,
     "attention.bidirectional", "<PST>"),
    # spans
    ("start-negative", {"prompt": P, "tp": {"start": -1, "stop": 2}}, False, "tp.spans.0.start", "greater than or equal to 0 (got -1)"),
    ("stop-equals-start", {"prompt": P, "tp": {"start": 2, "stop": 2}}, False, "tp.spans.0", "stop must be greater"),
    ("stop-before-start", {"prompt": P, "tp": {"start": 3, "stop": 1}}, False, "tp.spans.0", "start=3, stop=1"),
    ("overlapping-spans", {"prompt": P, "tp": [{"start": 0, "stop": 2}, {"start": 1, "stop": 3}]}, False, "tp",
     "spans overlap: [0, 2) and [1, 3)"),
    ("start-and-spans", {"prompt": P, "tp": {"start": 1, "stop": 2, "spans": []}}, False, "tp", "not both"),
    ("resume-negative", {"prompt": P, "tp": {"resume": -1}}, False, "tp.resume", "greater than or equal to 0 (got -1)"),
    ("resume-inside-span", {"prompt": P, "tp": {"spans": [{"start": 0, "stop": 3}], "resume": 2}}, False, "tp",
     "resume (2) must not come before"),
    # numbers out of range
    ("alpha-above-1", {"prompt": P, "tp": {**TP, "alpha": 1.5}}, False, "tp.alpha", "less than or equal to 1 (got 1.5)"),
    ("alpha-negative", {"prompt": P, "tp": {**TP, "alpha": -0.1}}, False, "tp.alpha", "greater than or equal to 0 (got -0.1)"),
    ("alpha-nan", f"prompt: '{P}'\ntp: {{start: 0, stop: 1, alpha: .nan}}", False, "tp.alpha", "finite"),
    ("source-not-negative", {"prompt": P, "tp": {**TP, "source": 0}}, False, "tp.source", "less than or equal to -1 (got 0)"),
    ("token-id-negative", {"prompt": P, "placeholder": {"token_id": -1}}, False, "placeholder.token_id", "(got -1)"),
    ("std-zero", {"prompt": P, "placeholder": {"std": 0}}, False, "placeholder.std", "greater than 0 (got 0)"),
    ("std-infinite", f"prompt: '{P}'\nplaceholder: {{init: gaussian, std: .inf}}", False, "placeholder.std", "finite"),
    ("mean-nan", f"prompt: '{P}'\nplaceholder: {{init: gaussian, mean: .nan}}", False, "placeholder.mean", "finite"),
    # enumerations
    ("init-unknown", {"prompt": P, "placeholder": {"init": "random"}}, False, "placeholder.init", "'gaussian'"),
    ("mask-unknown", {"prompt": P, "placeholder": {"mask": "yes"}}, False, "placeholder.mask", "'first_layer'"),
    ("pooling-unknown", {"pooling": "max"}, False, "pooling", "'last' or 'mean'"),
    ("compat-unknown", {"compat": "loose"}, False, "compat", "'exact' or 'official'"),
    ("bidirectional-unknown", {"prompt": P, "attention": {"bidirectional": "full"}}, False,
     "attention.bidirectional", "'last_token'"),
    # YAML that is not a plain mapping
    ("yaml-list", "- a\n- b\n", False, "<recipe>", "must be a mapping of fields, got list"),
    ("yaml-scalar", "just words", False, "<recipe>", "got str"),
    ("yaml-syntax", "prompt: [unclosed\n", False, "<recipe>", "not valid YAML"),
    ("yaml-python-object-apply", "!!python/object/apply:os.system ['echo pwned']\n", False, "<recipe>", "no tags"),
    ("yaml-python-object", "prompt: !!python/object:builtins.object {}\n", False, "<recipe>", "no tags"),
    ("yaml-python-name", "prompt: !!python/name:os.system\n", False, "<recipe>", "no tags"),
    ("yaml-duplicate-key", "exit_layer: 1\nexit_layer: 2\n", False, "exit_layer", "appears twice"),
    ("yaml-nested-duplicate-key", f"prompt: '{P}'\ntp: {{start: 1, start: 2, stop: 3}}\n", False, "tp.start",
     "appears twice"),
    ("yaml-binary", "prompt: !!binary aGVsbG8=\n", False, "prompt", "bytes value"),
    ("yaml-set", "prompt: !!set {a, b}\n", False, "prompt", "set value"),
    ("yaml-date", "name: 2024-01-01\n", False, "name", "date value"),
    ("yaml-int-key", "1: x\n", False, "<recipe>", "keys must be strings"),
    ("yaml-alias-bomb", _bomb(), False, "<recipe>", "too large"),
    ("yaml-deep-nesting", "prompt: " + "[" * 40 + "]" * 40, False, "prompt", "deeply nested"),
    ("ten-megabytes", "name: " + "a" * 10_000_000 + "\n", False, "<recipe>", "larger than 1000000 bytes"),
    # only wrong for this model (4 decoder layers, vocabulary 260)
    ("exit-layer-too-deep", {"exit_layer": 5}, True, "exit_layer", "model with 4 decoder layers"),
    ("exit-layer-too-negative", {"exit_layer": -6}, True, "exit_layer", "allowed: 0..4 or -5..-1"),
    ("span-beyond-last-layer", {"prompt": P, "tp": {"start": 2, "stop": 9}}, True, "tp.spans.0",
     "exceeds the model's 4 decoder layers"),
    ("second-span-beyond", {"prompt": P, "tp": [TP, {"start": 3, "stop": 5}]}, True, "tp.spans.1", "4 decoder layers"),
    ("resume-beyond-last-layer", {"prompt": P, "tp": {"resume": 4}}, True, "tp.resume", "4 decoder layers"),
    ("attention-layers-beyond", {"prompt": P, "attention": {"bidirectional": "sentence",
                                                            "layers": {"start": 0, "stop": 12}}}, True,
     "attention.layers", "4 decoder layers"),
    ("token-id-outside-vocab", {"prompt": P, "placeholder": {"token_id": 100_000}}, True, "placeholder.token_id",
     "outside the vocabulary (size 260)"),
    ("placeholder-several-tokens", {"prompt": P, "placeholder": {"token": "hello"}}, True, "placeholder.token",
     "is 5 tokens for this tokenizer; it must be one"),
    ("placeholder-no-token", {"prompt": P, "placeholder": {"token": ""}}, True, "placeholder.token", "is 0 tokens"),
    ("exit-auto-without-sweep", {"prompt": P, "tp": TP, "exit_layer": "auto"}, True, "exit_layer",
     "needs a stored sweep"),
]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("source,needs_model,field,fragment",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_recipe_names_its_field(source, needs_model, field, fragment, llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path))  # exit_layer: auto looks for a stored sweep here
    if needs_model:
        tpsurgery.parse_recipe(source)  # well-formed on its own ...
        model, tok = llama
        with pytest.raises(tpsurgery.RecipeError) as info:  # ... but not for this model
            tpsurgery.apply(model, source, tokenizer=tok)
    else:
        with pytest.raises(tpsurgery.RecipeError) as info:
            tpsurgery.parse_recipe(source)
    err = info.value
    assert isinstance(err, tpsurgery.TpsurgeryError) and err.field == field
    assert str(err).startswith(f"recipe field `{field}`: "), str(err)
    assert fragment in str(err), str(err)
    assert "Value error" not in str(err) and "tuple[" not in str(err) and "literal[" not in str(err)


def test_at_least_thirty_malformed_recipes():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_load_recipe_refuses_unsafe_huge_and_unreadable_files(tmp_path):
    cases = {
        "tagged.yaml": ("!!python/object/apply:os.system ['touch pwned']\n".encode(), "no tags"),
        "huge.yaml": (b"name: " + b"a" * 10_000_000 + b"\n", "larger than"),
        "latin1.yaml": ("name: caf\xe9\n".encode("latin-1"), "UTF-8"),
        "empty-name.yaml": (b"exit_layer: 1\nexit_layer: 1\n", "appears twice"),
    }
    for name, (data, fragment) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(tpsurgery.RecipeError, match=fragment) as info:
            tpsurgery.load_recipe(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) or fragment == "larger than"
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(tpsurgery.RecipeError, match="cannot read"):
        tpsurgery.load_recipe(tmp_path)  # a directory


def test_cli_validate_reports_one_line_per_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"prompt: '{P}'\ntp: {{start: 2, stop: 1}}\n")
    result = CliRunner().invoke(app, ["recipe", "validate", str(bad), "recipes/smollm2-prompteol-tp.yaml"])
    assert result.exit_code == 1
    assert "invalid:" in result.output and "recipe field `tp.spans.0`" in result.output
    assert "Traceback" not in result.output


def test_exit_layer_before_scheduled_tp_layers_warns_and_drops_them(llama):
    """Documented choice: TP before layer i cannot change hidden_states[M] for i >= M, so those layers are dropped
    with one warning naming the span (a sweep or an exit override may legitimately cut a schedule)."""
    model, tok = llama
    with pytest.warns(UserWarning, match=r"tp.spans.0 \[1, 4\): TP before decoder layers >= 2 is dropped") as rec:
        emb = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 1, "stop": 4}, "exit_layer": 2}, tokenizer=tok)
    assert len([w for w in rec if "dropped" in str(w.message)]) == 1
    assert [e.layer for e in emb.plan.at("layer_in")] == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing cut: no warning
        plan = tpsurgery.apply(model, {"prompt": P, "tp": {"start": 1, "stop": 2}, "exit_layer": 2}, tokenizer=tok).plan
        assert [e.layer for e in plan.at("layer_in")] == [1]


def test_a_marker_inside_a_word_is_refused_where_it_splits_a_token(smollm2):
    """A placeholder that tokenizes oddly: SmolLM2 reads ' sentence' as one token, so 'sent<PST>ence' has no token
    boundary for the placeholder in exact mode (official mode tokenizes the two pieces separately)."""
    model, tok = smollm2
    odd = 'This sent<PST>ence : "{text}" means in one word:"'
    for prompt, field in ((odd, "prompt"), ([P, odd], "prompt.1")):
        with pytest.raises(tpsurgery.RecipeError, match="splits the token ' sentence' \\(' sent' \\+ 'ence'\\)") as info:
            tpsurgery.apply(model, {"prompt": prompt, "tp": TP, "exit_layer": 2}, tokenizer=tok)
        assert info.value.field == field
    official = tpsurgery.apply(model, {"prompt": odd, "tp": TP, "exit_layer": 2, "compat": "official"}, tokenizer=tok)
    assert official.tokenize(["a"], odd)[0].placeholders == (2,)


# ------------------------------------------------------------------- issue 14: errors a researcher can act on
def test_every_problem_is_reported_at_once_with_did_you_mean():
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.parse_recipe(f"exit_layr: 3\nprompt: '{P}'\ntp: {{start: 1, stpo: 2}}\npooling: max\n")
    problems = dict(info.value.problems)
    assert "did you mean `exit_layer`?" in problems["exit_layr"]
    assert "did you mean `stop`?" in problems["tp.stpo"]
    assert "'last' or 'mean'" in problems["pooling"]
    assert all(f"recipe field `{f}`" in str(info.value) for f in problems)


def test_spans_deeper_than_the_model_name_the_allowed_range_all_at_once(llama):
    model, tok = llama  # 4 decoder layers
    recipe = {"prompt": P, "tp": [{"start": 1, "stop": 9}], "exit_layer": 7,
              "attention": {"bidirectional": "sentence", "layers": {"start": 0, "stop": 6}}}
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.apply(model, recipe, tokenizer=tok)
    problems = dict(info.value.problems)
    assert set(problems) == {"exit_layer", "tp.spans.0", "attention.layers"}
    assert "allowed: 0 <= start < stop <= 4" in problems["tp.spans.0"] and "allowed: 0..4" in problems["exit_layer"]


def test_a_mistyped_marker_is_flagged():
    typo = P.replace("<PST>", "<PTS>")
    with pytest.warns(UserWarning, match="'<PTS>'.*did you mean <PST>"):
        tpsurgery.parse_recipe({"prompt": typo})
    with pytest.raises(tpsurgery.RecipeError, match="found '<PTS>': did you mean <PST>"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tpsurgery.parse_recipe({"prompt": typo, "tp": TP})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tpsurgery.parse_recipe({"prompt": P + " <s> <POS>", "tp": TP})  # the marker itself, and other tags: quiet


@pytest.fixture(scope="module")
def llama_folder(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = llama
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_validate_with_a_model_checks_its_depth(llama_folder, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"prompt: '{P}'\ntp: {{start: 1, stop: 40}}\nexit_layer: 31\n")
    ok = CliRunner().invoke(app, ["recipe", "validate", str(deep)])
    assert ok.exit_code == 0, ok.output  # fine on its own ...
    result = CliRunner().invoke(app, ["recipe", "validate", str(deep), "smollm2-prompteol", "--model",
                                      str(llama_folder)])
    assert result.exit_code == 1  # ... but not for a 4-layer model: both problems named
    assert "`exit_layer`: 31 is out of range for a model with 4 decoder layers" in result.output
    assert "`tp.spans.0`: span [1, 40) exceeds" in result.output
    assert "ok: smollm2-prompteol" in result.output and "4 decoder layers, reads hidden_states[2]" in result.output


def test_an_nnsight_model_that_was_never_dispatched_is_dispatched(llama, llama_folder):
    import nnsight

    model, tok = llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel is deprecated in favour of TransformersModel
        lm = nnsight.LanguageModel(str(llama_folder), tokenizer=tok)
    assert not lm.dispatched
    recipe = f"prompt: '{P}'\ntp: {{start: 1, stop: 2}}\nexit_layer: 3"
    with tpsurgery.apply(lm, recipe) as emb, tpsurgery.apply(model, recipe, tokenizer=tok) as ref:
        assert (emb.encode(["a b", "c"]) == ref.encode(["a b", "c"])).all()
    meta = type(model)(model.config).to("meta")
    with pytest.raises(tpsurgery.ModelError, match="meta device.*dispatch=True"):
        tpsurgery.apply(meta, recipe, tokenizer=tok)


def test_an_nnsight_transformers_model_is_applied_like_its_model(llama, llama_folder):
    """docs/backends.md's two routes with nnsight 0.8's TransformersModel (not the deprecated LanguageModel): a model
    in memory with tokenizer=, and a folder loaded with dispatch=True and its own tokenizer. No warning either way."""
    import nnsight

    model, tok = llama
    recipe = f"prompt: '{P}'\ntp: {{start: 1, stop: 2}}\nexit_layer: 3"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        wrapped = nnsight.TransformersModel(model, tokenizer=tok)
        loaded = nnsight.TransformersModel(str(llama_folder), task="text-generation", dispatch=True)
    with tpsurgery.apply(model, recipe, tokenizer=tok) as ref:
        want = ref.encode(["a b", "c"])
    for lm in (wrapped, loaded):
        with tpsurgery.apply(lm, recipe) as emb:
            assert emb.tokenizer is lm.tokenizer and (emb.encode(["a b", "c"]) == want).all()


AUX = 'This sentence : "{text}" means in one word:"'


def test_edits_and_runs_problems_are_reported_at_once_with_did_you_mean():
    edits = [{"site": "attn_out_in", "layers": 2, "rows": "last", "op": "scale", "factr": 2},
             {"sitee": "layer_in", "layers": {"start": 1, "stpo": 3}, "op": "copy"}]
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.parse_recipe({"prompt": P, "edit_layer": 3, "edits": edits, "run": {"aux": AUX}})
    problems = dict(info.value.problems)
    assert "did you mean `factor`?" in problems["edits.0.factr"]
    assert "did you mean `site`?" in problems["edits.1.sitee"]
    assert "did you mean `stop`?" in problems["edits.1.layers.stpo"]
    assert "did you mean `runs`?" in problems["run"]
    assert "did you mean `exit_layer`?" in problems["edit_layer"]
    # the runs section: every bad run at once
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.parse_recipe({"prompt": P, "runs": {"2nd": AUX, "aux": "no slot", "tp": "<PST> {text}"}})
    assert [f for f, _ in info.value.problems] == ["runs.2nd", "runs.aux", "runs.tp"]
    # whole-recipe checks of edits: an unknown run (with its closest name) and rows an auxiliary run lacks, at once
    cp = {"site": "attn_out_in", "layers": 2, "op": "subtract"}
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.parse_recipe({"prompt": P, "runs": {"irrelevant": AUX},
                                "edits": [{**cp, "rows": "last", "run": "irrelevent"}, {**cp, "run": "irrelevant"}]})
    problems = dict(info.value.problems)
    assert "did you mean 'irrelevant'?" in problems["edits.0.run"]
    assert "no placeholders" in problems["edits.1.rows"]


def test_edit_layers_and_heads_beyond_the_model_are_reported_with_the_rest(llama):
    model, tok = llama  # 4 decoder layers, 4 heads
    edits = [{"site": "layer_in", "layers": [1, 6], "op": "scale", "factor": 2},
             {"site": "attn_out_in", "layers": 1, "rows": "last", "op": "scale", "factor": 2, "heads": [0, 9]}]
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.apply(model, {"prompt": P, "exit_layer": 9, "edits": edits}, tokenizer=tok)
    problems = dict(info.value.problems)
    assert set(problems) == {"exit_layer", "edits.0.layers", "edits.1.heads"}
    assert "allowed: 0..3" in problems["edits.0.layers"] and "allowed: 0..3" in problems["edits.1.heads"]


# --- issue 24: messages that say what the user did ---------------------------------------------------------------

def test_a_missing_recipe_file_is_file_not_found_not_the_list_of_shipped_names(tmp_path):
    from typer.testing import CliRunner

    from tpsurgery.cli import app

    for path in ("recipes/nothere.yaml", "nothere.yml", str(tmp_path / "mine.yaml"), "sub\\mine.json"):
        result = CliRunner().invoke(app, ["recipe", "validate", path])
        assert result.exit_code == 1 and f"file not found: {path}" in result.output, result.output
        assert "shipped" not in result.output
    near = CliRunner().invoke(app, ["recipe", "validate", "recipes/prompteol-tpp.yaml"])
    assert "file not found: recipes/prompteol-tpp.yaml; did you mean the shipped 'prompteol-tp'" in near.output
    named = CliRunner().invoke(app, ["recipe", "validate", "nothere"])  # a name, not a path: the library's names
    assert "no recipe file or shipped recipe named 'nothere'" in named.output and "prompteol-tp" in named.output
    assert tpsurgery.load_recipe("recipes/prompteol-tp.yaml").name == "prompteol-tp"  # the shipped path form stays


def test_a_yaml_syntax_error_names_the_file_first_then_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tp: {start: 1, stop: 2\nexit_layer: 3\n")
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.load_recipe(bad)
    assert info.value.message == (f"{bad}, line 2, column 11: not valid YAML: expected ',' or '}}', but got ':' "
                                  "(while parsing a flow mapping at line 1, column 5)")
    assert "<unicode string>" not in str(info.value)
    with pytest.raises(tpsurgery.RecipeError, match=r"`<recipe>`: line 1, column 9: not valid YAML: .*no tags"):
        tpsurgery.parse_recipe("prompt: !!python/object:os.system x\n")


@pytest.mark.parametrize("tp", [{"strat": 1, "stop": 2}, {"start": 1, "stpo": 2}, {"spans": [{"strat": 1, "stop": 2}]}])
def test_a_misspelt_tp_key_is_reported_once_where_the_user_wrote_it(tp):
    """`tp: {strat: 1, stop: 2}` reported `tp.strat` and also `tp.spans.0.start: Field required`, a field the user
    never wrote (the shorthand's span) and the same mistake twice."""
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.parse_recipe({"tp": tp, "exit_layer": 3})
    (field, message), = info.value.problems
    wrote = "tp.spans.0." if "spans" in tp else "tp."  # the unknown key where it is
    assert field == wrote + next(k for k in (tp["spans"][0] if "spans" in tp else tp) if k not in ("start", "stop"))
    assert "did you mean" in message


def test_a_missing_shorthand_field_is_still_reported():
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.parse_recipe({"tp": {"start": 1}})
    assert [f for f, _ in info.value.problems] == ["tp.spans.0.stop"]


@pytest.mark.parametrize("recipe, got", [
    ({"name": [1, 2]}, "(got a list of 2 items)"), ({"prompt": {"a": 1}}, "(got a mapping)"),
    ({"exit_layer": "x" * 70}, "(got a string of 70 characters)"), ({"tp": 3}, "(got 3)"),
    ({"pooling": None}, "(got None)"), ({"edits": [{"site": "layer_in", "layers": 1, "op": "scale", "factor": []}]},
                                        "(got a list of 0 items)")])
def test_every_type_error_says_what_it_got(recipe, got):
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.parse_recipe(recipe)
    assert all("(got " in m for _, m in info.value.problems if "should be" in m), info.value.problems
    assert got in str(info.value)
