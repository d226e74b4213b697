"""Property 10 of issue 5: recipes round-trip through YAML and JSON unchanged; invalid recipes name the field."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tpsurgery
from tpsurgery.library import load_recipe
from tpsurgery.recipe import dump_recipe, parse_recipe
from strategies import scaled, INVALID_EDITS, engine_recipes, schema_recipes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@given(raw=schema_recipes())
@scaled(4)
def test_yaml_and_json_round_trip(raw, tmp_path_factory):
    r = parse_recipe(raw)
    assert parse_recipe(dump_recipe(r)) == r
    assert parse_recipe(json.dumps(r.to_dict())) == r
    assert parse_recipe(r.to_dict()) == r
    assert parse_recipe(dump_recipe(parse_recipe(dump_recipe(r)))).to_dict() == r.to_dict()  # a fixed point
    d = tmp_path_factory.mktemp("r")
    (d / "r.yaml").write_text(dump_recipe(r), encoding="utf-8")
    (d / "r.json").write_text(json.dumps(r.to_dict(), ensure_ascii=False), encoding="utf-8")
    assert load_recipe(d / "r.yaml") == r == load_recipe(d / "r.json")
    assert parse_recipe(dump_recipe(r)).hash() == r.hash()


def _set(raw: dict, path: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {}) if isinstance(node.get(p), dict) or p not in node else node[p]
    node[last] = value
    return raw


@given(raw=engine_recipes(masks=True), edit=st.sampled_from(INVALID_EDITS))
@scaled(4)
def test_invalid_recipes_name_the_field(raw, edit):
    path, value, field = edit
    if path.startswith(("tp.", "attention.")) or path.startswith("placeholder."):
        raw.setdefault("prompt", "<PST> {text}")
        if raw["prompt"] is None or "<PST>" not in str(raw["prompt"]):
            raw["prompt"] = "<PST> {text}"
    bad = _set(raw, path, value)
    if path == "tp.resume":  # resume needs no spans to clash with
        bad["tp"]["spans"] = []
    with pytest.raises(tpsurgery.RecipeError) as info:
        parse_recipe(bad)
    assert info.value.field == field, f"{path}={value!r}: error names {info.value.field!r}: {info.value}"
    assert f"`{field}`" in str(info.value)


@given(data=st.data())
@scaled(2)
def test_recipes_beyond_the_model_depth_name_the_field(data):
    """Valid on paper, invalid for a 4-layer model: the error names the field when the recipe meets the model."""
    from prop_support import model_for

    model, tok = model_for("llama")
    raw = data.draw(engine_recipes(n_layers=4, masks=True), label="recipe")
    raw["prompt"] = raw.get("prompt") if "tp" in raw else "<PST> {text}"
    raw.setdefault("tp", {"spans": []})
    what = data.draw(st.sampled_from(["exit_high", "exit_low", "span", "resume", "attention"]), label="what")
    if what == "exit_high":
        raw["exit_layer"], field = data.draw(st.integers(5, 1000)), "exit_layer"
    elif what == "exit_low":
        raw["exit_layer"], field = data.draw(st.integers(-1000, -6)), "exit_layer"
    elif what == "span":
        raw["tp"] = {"spans": [{"start": 1, "stop": 2}, {"start": 3, "stop": data.draw(st.integers(5, 99))}]}
        field = "tp.spans.1"
    elif what == "resume":
        raw["tp"] = {"spans": [], "resume": data.draw(st.integers(4, 99))}
        field = "tp.resume"
    else:
        raw["attention"] = {"bidirectional": "sentence", "layers": {"start": 0, "stop": data.draw(st.integers(5, 99))}}
        field = "attention.layers"
    recipe = parse_recipe(raw)  # the schema alone accepts it
    with pytest.raises(tpsurgery.RecipeError) as info:
        tpsurgery.apply(model, recipe, tokenizer=tok)
    assert info.value.field == field, str(info.value)
