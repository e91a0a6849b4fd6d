"""The search (training): rank channel groups, choose nested sub-nets at MACs budgets, train them.

Search methods are found through `dyncompile.search.methods` (a registry keyed by name); `run.run_search`
is the one entry point the CLI and scripts call.
"""
