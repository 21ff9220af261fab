"""Every private or undocumented framework API ist_ds relies on, one module per framework.

A new DeepSpeed, torch or transformers release can rename what these modules reach into; keeping
every such access here (each with the version it was checked against, and a test in
``tests/test_compat.py`` that fails with a clear message when it changes) makes that a one-file fix.
"""
