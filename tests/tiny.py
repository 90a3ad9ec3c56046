"""Tiny random transformers models saved as ordinary checkpoint folders, for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "def add(a, b):\n    return a + b\n",
    "Émilie a mangé des crêpes à Paris. 東京は大きい都市です。 🙂🚀",
    "In the beginning the universe was created; this made many people angry.",
]

VOCAB = 320


def train_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer trained on CORPUS, with <s> </s> <pad> as ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def configs() -> dict:
    """model_type -> (transformers model class name, config kwargs) for tiny random models."""
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)),
        "llama": ("LlamaForCausalLM", "LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, **common)),
        "mistral": ("MistralForCausalLM", "MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=5, **common)),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common)),
        "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128,
                        num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                        max_position_embeddings=128, sliding_window=6, query_pre_attn_scalar=24, **common)),
    }


def make_hf_model(model_type: str, seed: int = 0):
    import transformers

    cls_name, cfg_name, kwargs = configs()[model_type]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kwargs)).eval()
    with torch.no_grad():  # random norm weights and biases, so that offsets and biases matter
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def save_tiny(model_type: str, folder: Path, seed: int = 0, **save_kwargs):
    """Save a tiny random model with a tokenizer as an ordinary HF checkpoint folder."""
    model = make_hf_model(model_type, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **save_kwargs)
    train_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False}))
    return model
