"""
A hyperGPT run as a transformers causal LM (written by export_hf.py): the repo's model.py, and the ops/ files it
imports, sit beside this file unchanged but for their imports, which export_hf.py makes relative (transformers
copies a model's files into its module cache one by one). So the exported model is the trained one, computed by
model.py's reference forms (impl="reference": plain torch, no compiled kernels).

Generation recomputes: generate() feeds the newest block_size tokens each step, as sample.py's window does, and
keeps no cache, so its greedy tokens are sample.py's (whose KV cache is exact) at O(T) work per token more.
"""
import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_hypergpt import HyperGPTConfig
from .model import GPT, GPTConfig


class HyperGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HyperGPTConfig
    base_model_prefix = "gpt"
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        self.gpt = GPT(GPTConfig(**config.model_args))
        self.post_init()

    def _init_weights(self, module):
        """Nothing: GPT initialises itself, and from_pretrained loads every weight."""

    def get_input_embeddings(self):
        return self.gpt.transformer.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=None, **kwargs):
        """input_ids (B, T), T <= block_size -> logits (B, T, vocab) at every position; with labels (B, T) also the
        mean next-token loss (labels shifted inside, -100 ignored, as transformers' causal LMs do). attention_mask
        may only be all ones: the model has no padding mask (right padding is harmless to a causal model's real
        tokens). Cache arguments are accepted and ignored: every call is a full forward."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("hyperGPT export: attention_mask with zeros (padding) is not supported; pass unpadded "
                             "rows, or right-padded rows without a mask")
        targets = torch.zeros_like(input_ids)  # GPT.forward returns every position's logits when given targets
        if labels is not None:
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)  # (B, T): next tokens
            targets = targets.masked_fill(targets == -100, -1)
        logits, loss = self.gpt(input_ids, targets)
        return CausalLMOutput(loss=loss if labels is not None else None, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """Each step reads the newest block_size tokens again (sample.py's window), without a cache."""
        return {"input_ids": input_ids[:, -self.config.max_position_embeddings:]}
