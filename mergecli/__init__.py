"""mergecli: merge neural-network checkpoints from a declarative YAML recipe."""

__version__ = "0.1.0"

__all__ = ["__version__"]
