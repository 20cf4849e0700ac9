"""Decoding rules, the sampling loop (KV cache, batched CFG) and the ``sample`` command.
It may import model, tokenizer and the shared modules (run directory, checkpoint IO, logs), never training.
"""
