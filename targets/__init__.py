"""Compilation targets, one module per kind (installed as dyncompile.targets)."""
