"""What puts the services to work, by role: serve/ (the Ray Serve app), api/ (the front doors),
observe/ (telemetry, dashboards), tools/ (CLI, plan, top, tune); local.py builds an engine
with its experts in this process."""
