"""Writes recipes/smollm2-actadd-steering.npy, the steering vector of the `smollm2-actadd-steering` recipe.

ActAdd (Turner et al., 2023) with its canonical pair: the difference of SmolLM2-135M's residual stream at the input
of decoder layer 3 (``hidden_states[3]``) between "I talk about Love" and "I talk about Hate", at their last token
(in context: SmolLM2's first position carries a ~750-norm "attention sink" row, so one-word prompts would subtract two
sinks), times the coefficient 0.1 (the raw difference, norm ~71, is about as long as a typical row, ~75).

    python scripts/make-actadd-vector.py
"""

from pathlib import Path

import numpy as np
import torch

import tpsurgery

LAYER = 3
COEFFICIENT = 0.1
OUT = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-actadd-steering.npy"


def residual(model, tok, text: str) -> torch.Tensor:
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER][0, -1].float()


if __name__ == "__main__":
    model, tok = tpsurgery.load_model("smollm2-135m")
    v = COEFFICIENT * (residual(model, tok, "I talk about Love") - residual(model, tok, "I talk about Hate"))
    np.save(OUT, v.numpy().astype(np.float32))
    print(OUT, v.shape, float(v.norm()))
