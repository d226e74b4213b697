"""MTEB 2.x adapter: ``mteb.evaluate(mteb_encoder(embedder), tasks)``, plus local (offline) STS tasks from SentEval files.

Needs the optional extra ``pip install 'tpsurgery[mteb]'`` (mteb>=2,<3); this module imports without it.

>>> import pytest; _ = pytest.importorskip("mteb")
>>> import tpsurgery
>>> from tpsurgery.testing import tiny_model
>>> model, tok = tiny_model("llama")
>>> enc = mteb_encoder(tpsurgery.apply(model, "prompt: '{text} means'\\nexit_layer: 2", tokenizer=tok), name="me/tiny")
>>> enc.mteb_model_meta.name, enc.mteb_model_meta.embed_dim, enc.mteb_model_meta.similarity_fn_name.value
('me/tiny', 32, 'cosine')
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .errors import ModelError


def _require_mteb() -> None:
    try:
        import mteb  # noqa: F401
    except ImportError as exc:
        raise ModelError("the MTEB adapter needs mteb 2.x: pip install 'tpsurgery[mteb]'") from exc


@functools.lru_cache(maxsize=None)
def _encoder_class() -> type:
    _require_mteb()
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ScoringFunction

    class MTEBEncoder(AbsEncoder):
        """An Embedder as an MTEB encoder (subclass of mteb's AbsEncoder, with ``mteb_model_meta``)."""

        def __init__(self, embedder: Any, name: str | None = None, batch_size: int = 32):
            self.model = embedder
            self.batch_size = batch_size
            base = name or getattr(embedder.model, "name_or_path", "") or type(embedder.model).__name__
            if "/" not in base:
                base = f"tpsurgery/{base}"
            dim = embedder.model.get_input_embeddings().weight.shape[1]
            # create_empty copies without validation: give enum members, not strings
            self.mteb_model_meta = ModelMeta.create_empty({
                "name": base, "revision": embedder.recipe.hash(), "embed_dim": dim,
                "similarity_fn_name": ScoringFunction.COSINE, "framework": ["PyTorch"], "open_weights": True,
            })

        def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str, prompt_type: Any = None,
                   **kwargs: Any) -> np.ndarray:
            """Embed every text of MTEB's DataLoader (batches are dicts with a ``text`` list) in one call."""
            texts = [t for batch in inputs for t in batch["text"]]
            return self.model.encode(texts, batch_size=kwargs.get("batch_size", self.batch_size),
                                     show_progress_bar=bool(kwargs.get("show_progress_bar", False)))

    return MTEBEncoder


def mteb_encoder(embedder: Any, name: str | None = None, batch_size: int = 32) -> Any:
    """An :class:`~tpsurgery.Embedder` as an MTEB encoder; its model meta gives the recipe hash as the revision."""
    return _encoder_class()(embedder, name, batch_size)


_META = dict(
    reference="https://github.com/facebookresearch/SentEval", dataset={"path": "local/senteval", "revision": "local"},
    type="STS", category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], main_score="cosine_spearman",
    date=("2012-01-01", "2017-12-31"), domains=[], task_subtypes=[], license="not specified",
    annotations_creators="human-annotated", dialect=[], sample_creation="found", bibtex_citation="",
    modalities=["text"],
)


def local_sts_task(name: str, data_dirs: Any, limit: int | None = None) -> Any:
    """An MTEB STS task over local SentEval-layout files (``name`` from :data:`tpsurgery.evaluation.TASKS`), offline.

    The data is what ``tpsurgery eval sts`` reads, so both harnesses can be compared on the same pairs. MTEB reports
    ``cosine_spearman`` in [-1, 1] (tpsurgery reports x100).
    """
    _require_mteb()
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    from .evaluation import TASKS, load_task

    pairs = load_task(name, data_dirs, limit)
    lo, hi = (1, 5) if name.startswith("sick") else (0, 5)

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(name=f"Local{TASKS[name].title.replace(' ', '').replace('-', '')}",
                                description=f"{TASKS[name].about} (local SentEval files)", **_META)
        min_score, max_score = lo, hi

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": list(pairs.a), "sentence2": list(pairs.b), "score": pairs.gold.tolist()})})
            self.data_loaded = True

    return LocalSTS()
