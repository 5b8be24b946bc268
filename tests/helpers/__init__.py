"""Helpers shared by the tests, imported as `helpers.<module>` (pytest puts
tests/ on sys.path; a child process is given that path explicitly).

- reference: small random checkpoints built with the transformers reference,
  and a runner driving it as its generation loop does.
- replay: recording the reference's `generate` and replaying its draws and
  logits through ours.
- tiny_tokenizer: a word-level tokenizer with Gemma 4's special tokens and a
  chat template.
- server: mlx_lm.server on a free loopback port, and a JSON POST to it.
- hostile: test_hostile_input.py's property, loader check and child cases.
- metal_emulation: mx.fast.metal_kernel emulated on the CPU (g++, ../metal_shim.h).
- cuda_build: the fused kernel's CUDA source as mlx writes it, compiled with nvcc.
- distributed_worker: a script, not imported: one rank of test_distributed.py,
  run by path under `mlx.launch`.
"""
