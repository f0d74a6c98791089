"""
The official HyperGLU module's API (LJC-FVNR/HyperMLP, hyperglu.py) on top of model.py: `from hyperglu import HyperGLU,
HyperGLUConfig` as there. HyperGLUConfig takes every official field and returns the GPTConfig of one layer;
model.HyperGLU loads the official state_dict strict and gives the official module's outputs (docs/implementation.md
lists the deliberate differences). Nothing in model.py depends on this file.
"""
from model import GPTConfig, HyperGLU  # noqa: F401  (HyperGLU: the official name, re-exported)


def HyperGLUConfig(*, n_embd, n_head, block_size, bias=False, n_layer=24, use_rope=False, attn_kind="glu",
                   impl_default="chunked", chunk_T=1024, op1_per_head=True, op2_per_head=True,
                   aligner_impl_train="padview", aligner_impl_eval="padview", **options):
    """The official HyperGLUConfig (LJC-FVNR/HyperMLP) as the GPTConfig of one layer, so HyperGLU(HyperGLUConfig(...))
    is the drop-in, on the reference rows as the official module runs. Its other fields (qk_rank, vo_rank, use_kv_conv,
    ..., do_masking, aligner_kind) are GPTConfig's, same names and defaults. attn_kind and use_rope become attn and pos,
    impl_default="dense" one chunk of block_size rows (the same rows); op*_per_head and aligner_impl_* are checked
    (the official code fails at forward without their one value), not stored."""
    for name, value, allowed in (("attn_kind", attn_kind, ("glu", "relu")),
                                 ("impl_default", impl_default, ("dense", "chunked")),
                                 ("op1_per_head", op1_per_head, (True,)), ("op2_per_head", op2_per_head, (True,)),
                                 ("aligner_impl_train", aligner_impl_train, ("padview",)),
                                 ("aligner_impl_eval", aligner_impl_eval, ("padview",))):
        if value not in allowed:
            raise ValueError(f"HyperGLUConfig.{name}={value!r} is not valid; expected one of {list(allowed)}")
    try:
        return GPTConfig(n_embd=n_embd, n_head=n_head, block_size=block_size, bias=bias, n_layer=n_layer,
                         attn="hyperglu" if attn_kind == "glu" else "hypermlp", pos="rope" if use_rope else "none",
                         chunk_T=block_size if impl_default == "dense" else chunk_T, impl="reference", **options)
    except ValueError as e:  # in the official names
        raise ValueError(str(e).replace("GPTConfig.pos='rope'", "GPTConfig.use_rope=True")
                         .replace("GPTConfig", "HyperGLUConfig")) from None
