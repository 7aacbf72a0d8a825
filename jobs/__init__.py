"""Entry points: ``python -m jobs.<name>`` locally or under ``ray job submit``."""
