"""Jobs: recipes, the job runner and its backend adapters, model building (including GGUF files),
data, evaluation, the launcher environment, pre-flight checks and the ``ist-ds`` command line.

The top of the import graph: it uses the backends and :mod:`ist_ds.observe`; nothing imports it
except ``launch/`` scripts and the console entry point.
"""
