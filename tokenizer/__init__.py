"""Images to codes and back (preprocessing, the VQ-VAE) and the merged text + image vocabulary.
It may import ``earlyfusion.model`` and the shared modules (errors, checkpoint IO, logs), never training or sampling.
"""
