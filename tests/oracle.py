"""An independent reference implementation of a recipe: plain PyTorch forward(-pre) hooks, one sentence at a time.

No nnsight, no batching, no padding: the hooks overwrite placeholder rows exactly as the paper describes, and the
embedding is read from HF's ``output_hidden_states``.
"""

from __future__ import annotations

import torch

from tpsurgery.arch import arch_for, get_path
from tpsurgery.plan import compile_plan
from tpsurgery.prompts import encode_prompts
from tpsurgery.recipe import Recipe


def oracle_encode(model, tokenizer, recipe: Recipe, texts: list[str], placeholder_id: int | None = None) -> torch.Tensor:
    spec = arch_for(model)
    layers = get_path(model, spec.layers)
    embed = get_path(model, spec.embed)
    plan = compile_plan(recipe, len(layers), embed.weight.shape[1], placeholder_id)
    per_template = []
    for template in recipe.templates:
        rows = encode_prompts(tokenizer, template, texts, plan.placeholder_id, preprocess=recipe.preprocessing,
                              compat=recipe.compat)
        outs = []
        for row in rows:
            ph = list(row.placeholders)
            handles = []
            if ph and plan.init_vector is not None:
                def init_hook(mod, args, out, ph=ph):
                    out = out.clone()
                    out[0, ph] = plan.init_vector.to(out.dtype)
                    return out
                handles.append(embed.register_forward_hook(init_hook))
            for i in plan.tp_layers if ph else ():
                def tp_hook(mod, args, kwargs, ph=ph):
                    h = args[0].clone()
                    src = h[0, len(row.ids) + plan.source].clone()
                    for p in ph:
                        h[0, p] = plan.alpha * src + (1 - plan.alpha) * h[0, p]
                    return (h, *args[1:]), kwargs
                handles.append(layers[i].register_forward_pre_hook(tp_hook, with_kwargs=True))
            try:
                ids = torch.tensor([row.ids])
                with torch.no_grad():
                    hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[plan.exit_layer]
            finally:
                for h in handles:
                    h.remove()
            if recipe.pooling == "last":
                outs.append(hs[0, -1].float())
            else:
                outs.append(hs[0, row.text_span[0]:row.text_span[1]].float().mean(0))
        per_template.append(torch.stack(outs))
    return torch.stack(per_template).mean(0)
