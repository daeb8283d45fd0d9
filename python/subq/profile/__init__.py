"""``subq-profile``: FLOP and bandwidth utilization of every op and its baselines over a size grid, placed against
the matmul and copy ceilings measured on the same device in the same run. ``python -m subq.profile --help``.

One job per file: ``cli`` (arguments, errors), ``ops/`` (one file per op or op family: grids, inputs, subq's
callable and its opt-in kernel variants, the baselines side by side (plain PyTorch, torch.compile, the reference
repositories' formulations), FLOP and byte formulas; the baselines and size axes several share have their own),
``check`` (subq against its float64 baseline), ``flags`` (the opt-in switch), ``ceilings`` (the measured peaks),
``timing`` (clocks, warm-up, median, input rotation), ``runner`` (the sweep), ``report`` (table, JSON, CSV,
``--compare``), ``roofline`` (the PNG).
"""
