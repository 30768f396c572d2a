"""Continued pretraining of converted models: ``modify train``."""
