"""dyncompile: give a trained static CNN run-time dynamic inference (nested, switchable sub-networks)."""

__version__ = "0.1.0"
