"""One metrics module (metrics.py) and one plotting module (plots.py) used by every evaluator in the project."""
