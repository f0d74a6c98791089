"""Fast paths for model.py, each tested against its reference there (tests/ops/); none imports model.py, and each
takes tensors and plain numbers and flags only.

  dispatch.py      the one place that picks each op's form (GPTConfig.impl, device, dtype, the environment)
  hyperglu.py      HyperGLU / HyperMLP rows chunk by chunk, O(T d) saved, maps recomputed in backward
  hyperglu_cpu.py  the fused C++ CPU kernel for the middle of those rows (csrc/hyperglu_cpu.cpp)
  hyperglu_triton.py  the Triton kernels for HyperGLU / HyperMLP on CUDA (launch.py: their launches)
  streams.py       HC / mHC sites (connect): the norm after the matmul, the pre-sublayer op, the in-place update
  streams_triton.py  the fused Triton kernels for HC / mHC sites on CUDA
  sinkhorn.py      Sinkhorn-Knopp with a hand-written backward
  conv.py          the causal depthwise KV conv as shifted multiply-adds
"""
