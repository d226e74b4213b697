"""The TransformerLens backend computes what the nnsight backend computes, and leaves models as it found them.

The agreement tests are properties: hypothesis draws recipes from the five families the issue names (PromptEOL,
PromptEOL+TP, several placeholders, TP with resume, masked placeholders; plus init vectors, alpha, attention edits,
pooling, exit layers and per-layer reads) and input texts, and both backends must agree within 1e-4 relative.
"""

from __future__ import annotations

import copy
import json
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsurgery
from tpsurgery.backends.tl_backend import TransformerLensBackend, boot_bridge, is_bridge
from tpsurgery.errors import BackendError, ModelError, TpsurgeryError
from tpsurgery.testing import tiny_model
from tpsurgery.foreign import observer

# random exit layers often cut TP spans short; compile_plan warns about that (tested elsewhere)
pytestmark = pytest.mark.filterwarnings("ignore:tp.spans.*is dropped:UserWarning")

TINY = ("llama", "qwen2", "gemma3", "mistral")
TOL = 1e-4
EOL = 'This sentence : "{text}" means in one word:"'


@functools.lru_cache(maxsize=None)
def tiny(arch: str):
    """``(model, tokenizer, bridge)``: one tiny model per arch and a bridge booted from a copy of it."""
    model, tok = tiny_model(arch, bos=arch == "llama")
    return model, tok, boot_bridge(model, tok)


# ------------------------------------------------------------------------------------------------- strategies
def _with_markers(draw, n: int) -> str:
    words = ["This", "sentence", ":", '"{text}"', "means", "in", "one", "word:"]
    for _ in range(n):
        words.insert(draw(st.integers(0, 3)), "<PST>")
    return " ".join(words)


@st.composite
def recipes(draw, n_layers: int) -> dict:
    """A recipe mapping from one of the issue's families, with random schedule, init, exit layer and pooling."""
    family = draw(st.sampled_from(["prompteol", "tp", "multi", "resume", "masked"]))
    r: dict = {"exit_layer": draw(st.integers(-(n_layers + 1), n_layers)),
               "pooling": draw(st.sampled_from(["last", "last", "mean"]))}
    if family == "prompteol":
        r["prompt"] = EOL
        return r
    r["prompt"] = _with_markers(draw, 2 if family == "multi" else 1)
    start = draw(st.integers(0, n_layers - 1))
    stop = draw(st.integers(start + 1, n_layers))
    tp: dict = {"start": start, "stop": stop, "alpha": draw(st.sampled_from([1.0, 1.0, 0.5])),
                "source": draw(st.sampled_from([-1, -1, -2]))}
    if family == "resume":  # start < stop <= resume < n_layers
        start = draw(st.integers(0, n_layers - 2))
        stop = draw(st.integers(start + 1, n_layers - 1))
        tp = {"spans": [{"start": start, "stop": stop}], "resume": draw(st.integers(stop, n_layers - 1))}
    if family == "masked" and draw(st.booleans()):
        tp = {}
    if tp:
        r["tp"] = tp
    r["placeholder"] = {"init": draw(st.sampled_from(["token", "token", "zeros", "gaussian"])), "seed": 1}
    if family == "masked":
        r["placeholder"]["mask"] = draw(st.sampled_from(["first_layer", "all"]))
        r["attention"] = {"bidirectional": draw(st.sampled_from(["none", "last_token", "sentence"]))}
    return r


texts = st.lists(st.text(st.sampled_from("abcxyz é,.?'\""), min_size=1, max_size=24), min_size=1, max_size=4)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def assert_agree(nn_emb, tl_emb, batch, all_layers, bs):
    """Same embeddings (or the same kind of error) from both backends."""
    try:
        want = nn_emb.encode(batch, batch_size=bs, all_layers=all_layers, convert_to_tensor=True)
    except TpsurgeryError as exc:  # e.g. mean pooling over an empty sentence: both must reject it alike
        with pytest.raises(type(exc)):
            tl_emb.encode(batch, batch_size=bs, all_layers=all_layers)
        return
    got = tl_emb.encode(batch, batch_size=bs, all_layers=all_layers, convert_to_tensor=True)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _rel(got, want) <= TOL, f"relative difference {_rel(got, want):.2e}"


# ------------------------------------------------------------------------------------------ agreement properties
@pytest.mark.parametrize("arch", TINY)
@given(data=st.data())
def test_tl_agrees_with_nnsight_on_tiny_models(arch, data):
    model, tok, bridge = tiny(arch)
    recipe = tpsurgery.parse_recipe(data.draw(recipes(model.config.num_hidden_layers), label="recipe"))
    nn_emb = tpsurgery.apply(model, recipe, tokenizer=tok)
    tl_emb = tpsurgery.apply(bridge, recipe, tokenizer=tok)
    assert tl_emb.backend.name == "transformer_lens" and tl_emb.plan.describe() == nn_emb.plan.describe()
    all_layers = data.draw(st.booleans(), label="all_layers")
    assert_agree(nn_emb, tl_emb, data.draw(texts, label="texts"), all_layers, data.draw(st.integers(1, 4)))


@pytest.fixture(scope="module")
def smollm2_bridge(smollm2):
    """A bridge booted by ``apply`` from the session's SmolLM2, and a snapshot of that model taken before."""
    model, tok = smollm2
    before = _snapshot(model, with_values=False)
    emb = tpsurgery.apply(model, {"prompt": EOL}, tokenizer=tok, backend="transformer_lens")
    return emb.backend.bridge, before


@settings(max_examples=4)
@given(data=st.data())
def test_tl_agrees_with_nnsight_on_smollm2(smollm2, smollm2_bridge, data):
    (model, tok), (bridge, _) = smollm2, smollm2_bridge
    recipe = tpsurgery.parse_recipe(data.draw(recipes(model.config.num_hidden_layers), label="recipe"))
    nn_emb = tpsurgery.apply(model, recipe, tokenizer=tok)
    tl_emb = tpsurgery.apply(bridge, recipe, tokenizer=tok)
    all_layers = data.draw(st.booleans(), label="all_layers")
    assert_agree(nn_emb, tl_emb, data.draw(texts, label="texts"), all_layers, 3)


def test_bfloat16_models_agree_when_both_run_eager_attention():
    """TL always runs eager attention; against an eager bf16 model the two backends compute the same numbers."""
    model, tok = tiny_model("llama", dtype=torch.bfloat16, attn="eager")
    recipe = {**MASKED_TP, "placeholder": {"mask": "first_layer", "init": "gaussian"}, "exit_layer": -1}
    tl_emb = tpsurgery.apply(model, recipe, tokenizer=tok, backend="transformer_lens")
    assert next(tl_emb.backend.bridge.parameters()).dtype == torch.bfloat16
    assert_agree(tpsurgery.apply(model, recipe, tokenizer=tok), tl_emb, ["a b", "xyz q", "hello"], True, 2)


def test_smollm2_untouched_and_bridge_tokenizer_not_used(smollm2, smollm2_bridge):
    """Booting went to a copy; without ``tokenizer=`` the model's own tokenizer (no BOS) is used, not TL's."""
    (model, tok), (bridge, before) = smollm2, smollm2_bridge
    assert _same(_snapshot(model, with_values=False), before)
    assert bridge.original_model is not model and bridge.original_model.config._attn_implementation == "eager"
    assert bridge.tokenizer("hello")["input_ids"] != tok("hello")["input_ids"]  # TL's tokenizer prepends BOS
    emb = tpsurgery.apply(bridge, {"prompt": EOL})
    assert emb.tokenize(["hello"], EOL)[0].ids == tpsurgery.apply(model, {"prompt": EOL}, tokenizer=tok) \
        .tokenize(["hello"], EOL)[0].ids


# --------------------------------------------------------------------------------- models are left as found
def _hooks(module: torch.nn.Module) -> dict:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    return {(n, a): tuple(getattr(m, a, {})) for n, m in module.named_modules() for a in names if getattr(m, a, {})}


def _snapshot(model: torch.nn.Module, with_values: bool = True) -> dict:
    params = {n: (p.data_ptr(), p.dtype, p.device, p.requires_grad,
                  p.detach().clone() if with_values else float(p.detach().double().sum()))
              for n, p in model.named_parameters()}
    return {
        "params": params if not with_values else {n: v[:4] for n, v in params.items()},
        "values": {n: v[4] for n, v in params.items()} if with_values else None,
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "config": model.config.to_dict(), "attn": model.config._attn_implementation, "training": model.training,
        "modules": [(n, type(m)) for n, m in model.named_modules()], "hooks": _hooks(model),
    }


def _same(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return x == y

    return eq(a, b)


MASKED_TP = {"prompt": 'This <PST> sentence : "{text}" means', "tp": {"start": 1, "stop": 4},
             "placeholder": {"mask": "first_layer"}, "attention": {"bidirectional": "last_token", "layers":
                                                                 {"start": 2, "stop": 3}}}


def test_users_model_and_tokenizer_are_untouched_by_booting():
    model, tok = tiny_model("gemma3")
    before, tok_before = _snapshot(model), (tok.padding_side, dict(tok.init_kwargs), tok("a b")["input_ids"], len(tok))
    nn_before = tpsurgery.apply(model, MASKED_TP, tokenizer=tok).encode(["a b", "xyz"])
    emb = tpsurgery.apply(model, MASKED_TP, tokenizer=tok, backend="transformer_lens")
    emb.encode(["a b", "xyz"], all_layers=True)
    assert emb.tokenizer is tok and emb.backend.bridge.original_model is not model
    assert type(emb.backend.bridge.original_model.model.layers[0]).__name__ != "Gemma3DecoderLayer"  # the copy was bridged
    assert _same(_snapshot(model), before)
    assert (tok.padding_side, dict(tok.init_kwargs), tok("a b")["input_ids"], len(tok)) == tok_before
    assert (tpsurgery.apply(model, MASKED_TP, tokenizer=tok).encode(["a b", "xyz"]) == nn_before).all()


def _bridge_state(bridge) -> dict:
    return {"hooks": _hooks(bridge), "stop": [getattr(b, "_stop_at_layer_idx", None) for b in bridge.blocks],
            "context_level": getattr(bridge, "context_level", 0), "training": bridge.training}


def test_a_users_bridge_is_left_as_found_also_after_a_failure():
    model, tok = tiny_model("qwen2")
    bridge = boot_bridge(model, tok)
    bridge(torch.tensor([[1, 2, 3]]), return_type=None)  # TL wires capture hooks of its own on a first forward
    seen = []
    bridge.hook_dict["blocks.1.hook_resid_pre"].add_hook(lambda t, hook: seen.append(1), is_permanent=True)
    before = _bridge_state(bridge)
    for exit_layer in (2, -1):
        emb = tpsurgery.apply(bridge, {**MASKED_TP, "exit_layer": exit_layer}, tokenizer=tok)
        emb.encode(["a b", "xyz"], all_layers=True)
        assert _bridge_state(bridge) == before
    assert seen, "the user's own hook stays installed and fires"
    good = next(iter(emb.batches(emb.tokenize(["a b", "xyz"], emb.recipe.templates[0]), 2)))[1]
    bad = type(good)(**{**good.__dict__, "placeholders": good.placeholders + 99})  # the TP hook of layer 1 fails mid-run
    with pytest.raises(BackendError, match="Qwen2ForCausalLM"):
        emb.backend.run(emb.plan, bad)
    assert _bridge_state(bridge) == before
    assert _rel(emb.backend.run(emb.plan, good), tpsurgery.apply(model, emb.recipe, tokenizer=tok).backend
                .run(emb.plan, good)) <= TOL


# ------------------------------------------------------------------------------------- early exit and dispatch
def test_layers_after_the_exit_and_the_unembedding_never_run():
    model, tok, bridge = tiny("llama")
    calls: dict = {}  # modules entered (the read of block M - 1's output ends the pass: block M is never entered)
    handles = [m.register_forward_pre_hook(observer(lambda mod, a, k=k: calls.__setitem__(k, calls.get(k, 0) + 1)))
               for k, m in [*((f"block{i}", b) for i, b in enumerate(bridge.blocks)),
                            ("ln_final", bridge.ln_final), ("unembed", bridge.unembed)]]
    try:
        for exit_layer, ran in ((2, {"block0", "block1"}), (-1, {"block0", "block1", "block2", "block3", "ln_final"})):
            calls.clear()
            tpsurgery.apply(bridge, {"prompt": EOL, "exit_layer": exit_layer}, tokenizer=tok).encode("a b")
            assert set(calls) == ran
    finally:
        for h in handles:
            h.remove()


def test_apply_dispatches_bridges_and_rejects_mismatches():
    model, tok, bridge = tiny("llama")
    assert is_bridge(bridge) and not is_bridge(model)
    assert isinstance(tpsurgery.apply(bridge, {"prompt": EOL}, tokenizer=tok).backend, TransformerLensBackend)
    assert tpsurgery.apply(model, {"prompt": EOL}, tokenizer=tok).backend.name == "nnsight"
    with pytest.raises(ModelError, match="transformer_lens backend"):
        tpsurgery.apply(bridge, {"prompt": EOL}, tokenizer=tok, backend="nnsight")
    with pytest.raises(ModelError, match="TransformerBridge"):
        TransformerLensBackend(model)
    with pytest.raises(ModelError, match="unknown backend"):
        tpsurgery.apply(model, {"prompt": EOL}, tokenizer=tok, backend="jax")
    emb = tpsurgery.apply(bridge, {"prompt": EOL})  # a tiny model has no name to load a tokenizer from: TL's own
    assert emb.tokenizer is bridge.tokenizer
    assert "backend transformer_lens" in emb.explain("a b")
    twin = copy.deepcopy(model)
    assert tpsurgery.apply(twin, {"prompt": EOL}, tokenizer=tok, backend="transformer_lens").backend.bridge \
        .original_model is not twin


def test_an_adapter_without_attention_component_is_named():
    """A bridge whose block exposes no ``attn`` cannot take a mask edit: a BackendError naming field and layer."""
    model, tok, _ = tiny("llama")
    bridge = boot_bridge(model, tok)  # a private bridge: this test takes a component away
    del bridge.blocks[0].attn
    emb = tpsurgery.apply(bridge, {"prompt": "x <PST> {text} y", "placeholder": {"mask": "first_layer"},
                                   "exit_layer": 2}, tokenizer=tok)
    with pytest.raises(BackendError, match=r"placeholder.mask.*blocks.0.attn.*nnsight") as err:
        emb.encode(["a b"])
    assert err.value.layer == 0


def test_cli_backend_option(tmp_path, monkeypatch):
    """``--backend transformer_lens`` on eval and sweep: the same scores as nnsight; an unknown name lists the two."""
    from pathlib import Path

    from typer.testing import CliRunner

    from tpsurgery.cli import app

    samples = Path(__file__).resolve().parents[2] / "shared" / "data" / "format-samples"
    if not samples.is_dir():
        pytest.skip(f"{samples} is not present")
    monkeypatch.setenv("TPSURGERY_CACHE", str(tmp_path / "cache"))  # the sweep stores its result for 'auto'
    model, tok = tiny_model("llama", n_layers=3, seed=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text("prompt: 'This : <PST> \"{text}\" means'\ntp: {start: 1, stop: 2}\nexit_layer: 2\n")
    common = ["-r", str(tmp_path / "r.yaml"), "-m", str(tmp_path / "m"), "-d", str(samples), "--no-progress"]
    cli = CliRunner()
    scores = {}
    for backend in ("nnsight", "transformer_lens"):
        out = tmp_path / backend
        res = cli.invoke(app, ["eval", "sts", *common, "--tasks", "sts13", "--backend", backend, "-o", f"{out}.json"])
        assert res.exit_code == 0, res.output
        res = cli.invoke(app, ["sweep", *common, "--task", "stsb", "--stops", "2,3", "--backend", backend,
                               "--memory-gb", "1e-6", "-o", str(out)])
        assert res.exit_code == 0, res.output
        runs = json.loads(Path(f"{out}.json").read_text())["runs"]
        sweep = json.loads((out / "sweep.json").read_text())
        assert runs[0]["backend"] == sweep["backend"] == backend
        assert sweep["layer_forwards_per_batch"] < sweep["layer_forwards_per_batch_unshared"] or backend != "nnsight"
        scores[backend] = (runs[0]["scores"]["sts13"], [r["scores"] for r in sweep["rows"]])
    assert scores["transformer_lens"][0] == pytest.approx(scores["nnsight"][0], abs=1e-2)
    for a, b in zip(*(scores[k][1] for k in scores)):
        assert a == pytest.approx(b, abs=1e-2, nan_ok=True)
    bad = cli.invoke(app, ["eval", "sts", *common, "--tasks", "sts13", "--backend", "jax"])
    assert bad.exit_code != 0 and "choose from nnsight, transformer_lens" in str(bad.exception)
