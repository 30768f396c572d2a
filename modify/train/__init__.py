"""Continued pretraining of converted models: ``modify train``.

Settings (:mod:`~modify.train.config`), data (:mod:`~modify.train.data`), the loop (:mod:`~modify.train.loop`),
what learns (:mod:`~modify.train.trainable`), distillation (:mod:`~modify.train.distill`), checkpoints,
distributed runs, selection statistics, metrics and the report, and held-out evaluation.

May import: :mod:`modify.io` and every layer below it; not :mod:`modify.calibrate` or :mod:`modify.generate`.
"""
