"""dyncompile: give a trained static CNN run-time dynamic inference (nested, switchable sub-networks)."""

import warnings as _warnings

__version__ = "0.1.0"

# torch 2.13's own pytree code warns about its own deprecated LeafSpec check whenever an exported program or a
# graph module is deep-copied; it is not actionable by our users and would print on every build.
_warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
