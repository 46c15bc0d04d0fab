"""Operator tools: the moe-serve CLI, the placement planner, top and tune."""
