"""Model preparation (pull, convert, quantize, quality gate) and the model store.

Only store.py is used at run time; the rest needs the `convert` extra."""
