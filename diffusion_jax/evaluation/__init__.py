"""Evaluation: metrics, the analyses by name (registry, analyses), and the evaluate and
compare drivers."""
