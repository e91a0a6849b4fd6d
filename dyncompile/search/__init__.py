"""The search (training): rank channel groups, choose nested sub-nets at MACs budgets, train them.

`run.run_search` is the one entry point the CLI, the benchmarks and notebooks call. Search methods are found
through `dyncompile.search.methods` (a registry keyed by name); importing this package registers the built-in
ones, so `--method` and `SearchOptions.check` see them whichever module of the package is imported first.
"""

from dyncompile.search import progressive, usnet  # noqa: F401  (each registers its search method)
