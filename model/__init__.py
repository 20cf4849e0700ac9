"""The decoder architecture (config, blocks, model, KV cache), built from plain torch modules; the faster ways to
run it, put in from outside by swapping submodules (attention and decode-step plans, torch.compile wrappers);
transformers' Chameleon weight mapping; and the conversion of checkpoints of the earlier weight layout. It imports
nothing from the other stages, only ``earlyfusion.core``.
"""
