"""Graph-to-graph steps of the dyncompile pipeline, one module per pass (installed as dyncompile.passes)."""
