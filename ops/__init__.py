"""Fast paths for model.py, each tested against its reference there (tests/test_ops.py); none imports model.py.

  hyperglu.py      HyperGLU / HyperMLP rows chunk by chunk, O(T d) saved, maps recomputed in backward
  hyperglu_cpu.py  the fused C++ CPU kernel for the middle of those rows (csrc/hyperglu_cpu.cpp)
  streams.py       HC / mHC sites (connect): the norm after the matmul, the pre-sublayer op, the in-place update
  streams_triton.py  the fused Triton kernels for HC / mHC sites on CUDA (tests/test_streams_triton.py)
  sinkhorn.py      Sinkhorn-Knopp with a hand-written backward
  conv.py          the causal depthwise KV conv as shifted multiply-adds
"""
