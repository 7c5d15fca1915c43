"""supcon: supervised contrastive learning of image classifiers in PyTorch."""

__version__ = "0.1.0"
