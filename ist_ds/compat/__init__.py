"""Every private or undocumented framework API ist_ds relies on, one module per framework.

- :mod:`ist_ds.compat.deepspeed`: the engine, ZeRO-1/2/3 optimizers and parameters, ZeRO-3's linear,
  checkpoint classes, config validation (DeepSpeed 0.19.8);
- :mod:`ist_ds.compat.monitor`: DeepSpeed's monitor (DeepSpeed 0.19.8);
- :mod:`ist_ds.compat.torch`: FSDP2's lazy initialisation, composable activation checkpointing (torch 2.13.0);
- :mod:`ist_ds.compat.transformers`: Trainer's private methods, accelerate's process state, model
  registries (transformers 5.24.0, accelerate 1.15.0).

A new DeepSpeed, torch or transformers release can rename what these modules reach into; keeping
every such access here (each with the version it was checked against, and a test in
``tests/test_compat.py`` that fails with a clear message when it changes) makes that a one-file fix.
The same test file fails when code outside this package touches a framework internal. These
modules import nothing of ist_ds but :mod:`ist_ds.core.errors`.
"""
