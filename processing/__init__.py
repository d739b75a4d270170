"""Data-preparation command lines and the demo's shapes dataset (`processing.shapes_dataset`).

A folder of the repository, not part of the installed ``modeling_msclip`` package (which imports nothing from
here): the demo, the entry scripts, the benchmarks and the tests import it from a checkout. The scripts also run as
files (``python processing/make_shapes_dataset.py ...``).
"""
