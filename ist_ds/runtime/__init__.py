"""What runs between two optimizer steps, the same on every backend: the controller (selection,
scoring schedule, state), the importance scoring passes, the collectives that keep ranks in
agreement, and checkpoints of IST's own state.

Imports :mod:`ist_ds.core`, :mod:`ist_ds.model` and :mod:`ist_ds.optim`; the backends adapt it to
one engine each.
"""
