"""args-local: ARGS (Alignment as Reward-Guided Search) decoding on local models."""

__version__ = "0.1.0"
