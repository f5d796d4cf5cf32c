"""A tiny random LLaMA folder with a tokenizer (and optionally a chat template), for the causal-LM tests
(tests/ is on sys.path under pytest)."""
from pathlib import Path

import torch
import transformers

from edgeslim.zoo import _tiny_tokenizer


def llama_folder(path: Path, hidden: int = 32, positions: int = 160, chat_template: str | None = None) -> Path:
    """save_pretrained of a 2-layer LLaMA (GQA: 4 heads, 2 kv heads, tied head) and the tiny tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=90, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=positions, tie_word_embeddings=True, eos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer().backend_tokenizer,
                                               unk_token="[UNK]", eos_token="[SEP]")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    return path
