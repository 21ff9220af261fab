"""The model's side of IST: which transformer blocks exist, which of their parameters train, how a
block is suppressed during scoring, and the optimizer parameter groups, one per block.

Imports :mod:`ist_ds.core` only; nothing here knows about optimizers, collectives or engines.
"""
