"""Backends execute a :class:`~tpsurgery.plan.Plan` on a :class:`~tpsurgery.plan.Batch`.

Each backend exposes ``run(plan, batch, all_layers=False) -> Tensor``: ``[B, d]`` float32 pooled embeddings read at
the plan's exit layer, or ``[B, exit_layer + 1, d]`` (hidden_states[0..M], each pooled) with ``all_layers=True``.
"""
