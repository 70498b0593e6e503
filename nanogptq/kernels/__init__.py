"""GPU kernels: tensors in, tensors out. A leaf: imports torch and triton only, nothing of nanogptq's models,
quantizers, checkpoints or runtime (tests/test_layers.py checks it).

    launch.py            NVRTC compilation and programmatic-dependent launches
    mma.py               the tensor-core 4-bit GEMV (op nanogptq::mma_gemv)
    triton_gemv.py       the Triton 4/8-bit GEMV (op nanogptq::gemv) and its INTERLEAVED layout
    triton_dequant.py    a GEMV layout back to a float weight, for prefill
    decode_attention.py  split-cache attention of one decoded token (op nanogptq::decode_attention)
"""
