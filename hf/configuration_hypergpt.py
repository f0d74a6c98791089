"""
The transformers config of a hyperGPT export (export_hf.py): model_args, the GPTConfig fields of the run's
checkpoint, as model.py beside this file reads them, plus the names transformers and lm-eval look for.
"""
from transformers import PretrainedConfig


class HyperGPTConfig(PretrainedConfig):
    model_type = "hypergpt"

    def __init__(self, model_args=None, tokenizer=None, **kwargs):
        self.model_args = dict(model_args or {})  # GPTConfig(**model_args) is the model
        self.tokenizer = tokenizer                 # the run's tokenizer spec (data/tokenizer.py): kind, vocab_size
        a = self.model_args
        # what transformers and lm-eval read: the vocabulary, the context (lm-eval truncates to it), the sizes
        self.vocab_size = a.get("vocab_size")
        self.max_position_embeddings = a.get("block_size")
        self.hidden_size = a.get("n_embd")
        self.num_hidden_layers = a.get("n_layer")
        self.num_attention_heads = a.get("n_head")
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
