"""The Ray Serve application: builder, deployments, endpoint directory, autoscaling policy, app config."""
