"""Multi-view evaluation: predictions over a split, metrics and reports."""
