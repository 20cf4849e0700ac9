"""earlyfusion: discrete-token early-fusion models (image tokenizer, merged vocabulary, decoder, sampling).

This folder owns what every stage shares (errors, checkpoint IO, logging, the run directory) and the
top of the stack (evaluation, the demo driver, the ``earlyfusion`` command); the stages live in
``earlyfusion.model``, ``.tokenizer``, ``.training`` and ``.sampling`` and import only downwards.
"""
