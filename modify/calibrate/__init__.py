"""Calibration: measure each block's tolerance of routing on text, plan capacities under a FLOP budget, fit
the routers, and save the plan (``modify calibrate``, ``modify convert --calibrate``).

- :mod:`modify.calibrate.calibration`: the measurements, the router fit, applying a calibration to a model;
- :mod:`modify.calibrate.planning`: schedules without data and the exact planner under a budget;
- :mod:`modify.calibrate.plan_file`: PLAN.json, the fitted routers beside it, and its chart;
- :mod:`modify.calibrate.agreement`: how often the causal rule decides as top-k would (``modify.measure_agreement``).

May import: :mod:`modify.io` and every layer below it; not :mod:`modify.train` or :mod:`modify.generate`.
"""
