"""MoE routing: top-k gating, the dispatch plan and combine, routing statistics."""
