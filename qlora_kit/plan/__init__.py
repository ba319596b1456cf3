"""Plan: how much memory a run will take, and the settings that make it fit, before anything loads.

recipes.py is a run's settings (the Recipe, the shipped recipes/); memory.py the memory model, one term per
component (docs/memory.md); planner.py the plan for a target card or this machine (PlanReport, step shapes that
cost less when memory runs out); choose.py picks and tunes a recipe for `auto`. Imports: probe/, architectures/
and the shared modules.
"""
