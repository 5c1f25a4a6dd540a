"""Evaluation metrics: FLARE's official per-task metrics, report-text metrics, and the real GREEN judge."""
