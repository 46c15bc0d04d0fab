"""Names every layer of cluster/ agrees on: the deployments' (Serve's keys, the policy's
report, the dashboard's labels) and the routed-load metric's, as /metrics writes it."""

FRONTEND = "Frontend"
ATTENTION = "Attention"
GROUP_PREFIX = "ExpertGroup-"           # + the group's index
ROUTED = "moe_serve_router_routed_tokens_total"
