"""The built-in reference policy: a small DeepseekV3-architecture model (Kimi K2's architecture: MLA attention, MoE
with routed and shared experts) built from `model.tiny`, and a byte-level BPE tokenizer trained locally on the
task's text with a ChatML-style chat template that knows `<think>` and `<tool_call>` markup. Nothing is
downloaded. The result is saved as an ordinary HF directory (`rollouts.model.save_policy`), so every later stage
loads policies one way (`rollouts.model.load_policy`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, DeepseekV3Config, PreTrainedTokenizerFast

from rollouts.config import TinyModelConfig
from rollouts.model import CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` with digits kept as single tokens.

    Single-digit tokens matter: a model that must copy numbers between the question, the tool call and the
    answer learns it far faster when every number is spelled digit by digit.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_deepseek_v3_config(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> DeepseekV3Config:
    """A DeepseekV3 config small enough to train on two CPU cores (sizes from `model.tiny`)."""
    return DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.hidden_size * 2,
        moe_intermediate_size=tiny.moe_intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        n_shared_experts=tiny.n_shared_experts,
        n_routed_experts=tiny.n_routed_experts,
        num_experts_per_tok=tiny.experts_per_token,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        kv_lora_rank=tiny.kv_lora_rank,
        q_lora_rank=None,
        qk_rope_head_dim=tiny.qk_rope_head_dim,
        qk_nope_head_dim=tiny.qk_nope_head_dim,
        v_head_dim=tiny.v_head_dim,
        max_position_embeddings=tiny.max_position_embeddings,
        num_mtp_layers=0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=0.02,
    )


def build_tiny_policy(
    tiny: TinyModelConfig, corpus: Iterable[str], seed: int
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Train the tokenizer on `corpus` and initialize a tiny DeepseekV3 model for it."""
    tokenizer = train_tokenizer(corpus, tiny.vocab_size)
    torch.manual_seed(seed)
    config = tiny_deepseek_v3_config(tiny, tokenizer)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, experts_implementation=tiny.experts_implementation
    )
    return model, tokenizer
