"""An expert shard: its experts' weights, the SwiGLU math, the ExpertShard gRPC server and a
launcher; runs without Ray."""
