"""The fused sampler kernels' sources (Metal and CUDA), read by mlx_diffusiongemma.kernels."""
