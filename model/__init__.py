"""The decoder architecture (config, blocks, model, KV cache), its torch.compile wrappers and transformers'
Chameleon weight mapping. It imports nothing from the other stages, only ``earlyfusion.errors``.
"""
