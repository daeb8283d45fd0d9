"""Training and evaluation of subq's models on a generated corpus: ``python -m subq.train`` (see
:mod:`subq.train.cli`). A model becomes trainable with one entry in :data:`subq.train.registry.MODELS`."""
