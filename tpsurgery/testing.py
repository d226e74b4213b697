"""Tiny random decoders and an offline byte-level tokenizer, for tests, doctests and benchmarks (no downloads).

>>> model, tok = tiny_model("qwen2", n_layers=3)
>>> model.config.num_hidden_layers, tok("hé")["input_ids"]
(3, [104, 195, 169])
"""

from __future__ import annotations

import functools
from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "falcon",
         "mixtral", "qwen2_moe", "qwen3_moe", "olmo", "olmo2", "granite", "cohere", "stablelm", "starcoder2", "smollm3")
VOCAB = 260  # 256 bytes + <pad> <bos> <eos> <unk>
PAD, BOS, EOS, UNK = 256, 257, 258, 259


@functools.lru_cache(maxsize=4)
def _tokenizer_object(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_map = {c: i for i, c in enumerate(sorted(alphabet, key=lambda ch: _byte_of(ch)))}
    vocab = {**byte_map, "<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": UNK}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return tok


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_of(ch: str) -> int:
    return {v: k for k, v in _bytes_to_unicode().items()}[ch]


def tiny_tokenizer(bos: bool = False) -> Any:
    """A fast byte-level tokenizer (token id = byte value) with offsets; ``bos=True`` prepends ``<bos>``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(bos), pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>",
    )


def tiny_config(arch: str, n_layers: int = 4, hidden: int = 32, attn: str | None = None) -> Any:
    """A transformers config of a tiny random decoder of family ``arch`` (one of :data:`ARCHS`)."""
    import transformers as T

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    llama_like = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
    table = {
        "llama": (T.LlamaConfig, llama_like),
        "mistral": (T.MistralConfig, {**llama_like, "sliding_window": None}),
        "qwen2": (T.Qwen2Config, llama_like),
        "qwen3": (T.Qwen3Config, {**llama_like, "head_dim": hidden // 4}),
        "gemma": (T.GemmaConfig, {**llama_like, "head_dim": hidden // 4}),
        "gemma2": (T.Gemma2Config, {**llama_like, "head_dim": hidden // 4, "sliding_window": 6}),
        "gemma3": (T.Gemma3TextConfig, {**llama_like, "head_dim": hidden // 4, "sliding_window": 6,
                                         "layer_types": [("full_attention" if (i + 1) % 3 == 0 else "sliding_attention")
                                                         for i in range(n_layers)]}),
        "phi3": (T.Phi3Config, {**llama_like, "pad_token_id": PAD}),
        "gpt2": (T.GPT2Config, dict(n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=512, **common)),
        "gpt_neox": (T.GPTNeoXConfig, dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                                          num_attention_heads=4, max_position_embeddings=512, **common)),
        "opt": (T.OPTConfig, dict(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=n_layers,
                                  num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=hidden,
                                  **common)),
        "falcon": (T.FalconConfig, dict(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                                        new_decoder_architecture=False, multi_query=True, alibi=False,
                                        max_position_embeddings=512, **common)),
        "mixtral": (T.MixtralConfig, {**llama_like, "num_local_experts": 2, "num_experts_per_tok": 1}),
        "qwen2_moe": (T.Qwen2MoeConfig, {**llama_like, "num_experts": 2, "num_experts_per_tok": 1,
                                         "moe_intermediate_size": hidden, "shared_expert_intermediate_size": hidden}),
        "qwen3_moe": (T.Qwen3MoeConfig, {**llama_like, "head_dim": hidden // 4, "num_experts": 2,
                                         "num_experts_per_tok": 1, "moe_intermediate_size": hidden}),
        "olmo": (T.OlmoConfig, llama_like),
        "olmo2": (T.Olmo2Config, llama_like),
        "granite": (T.GraniteConfig, {**llama_like, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                      "attention_multiplier": 0.25, "logits_scaling": 2.0}),
        "cohere": (T.CohereConfig, llama_like),
        "stablelm": (T.StableLmConfig, {**llama_like, "partial_rotary_factor": 0.5}),
        "starcoder2": (T.Starcoder2Config, {**llama_like, "sliding_window": None}),
        "smollm3": (T.SmolLM3Config, llama_like),
    }
    if arch not in table:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(ARCHS)}")
    cls, kwargs = table[arch]
    cfg = cls(**kwargs)
    cfg._attn_implementation = attn or ("eager" if arch == "gemma2" else "sdpa")  # Gemma2 has no sdpa path
    return cfg


def tiny_model(arch: str = "llama", n_layers: int = 4, hidden: int = 32, seed: int = 0, attn: str | None = None,
               bos: bool = False, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a tiny random causal LM of family ``arch`` in eval mode, seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers, hidden, attn), dtype=dtype).eval()
    return model, tiny_tokenizer(bos=bos)
