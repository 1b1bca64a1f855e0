"""Command-line verbs: the only place that prints, reads argv or exits."""
