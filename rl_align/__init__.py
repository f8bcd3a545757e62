"""rl-align: preference alignment and safe policy optimization on MuJoCo."""

__version__ = "0.1.0"
