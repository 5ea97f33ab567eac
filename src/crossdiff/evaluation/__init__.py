"""Evaluation: image-similarity metrics with the definitions the field compares against."""
