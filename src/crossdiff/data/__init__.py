"""Datasets: manifests (which files form a case), prepared cases on one grid, and slice datasets."""
