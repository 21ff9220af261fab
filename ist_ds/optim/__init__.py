"""The optimizer's side of IST: the gate that lets only the selected blocks' groups step, and the
store that keeps, offloads or drops the optimizer state of the others (memory parked in place).

Imports :mod:`ist_ds.core` and :mod:`ist_ds.model`; works with any ``torch.optim.Optimizer``.
"""
