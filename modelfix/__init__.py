"""modelfix: repair image classifiers that learned a spurious shortcut, and prove what changed."""

__version__ = "0.1.0"
