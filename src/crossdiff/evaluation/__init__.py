"""Evaluation: metrics with the definitions the field compares against, statistics, robustness,
sample variability, cost, FID, figures and reports; `crossdiff evaluate` and `crossdiff benchmark`."""
