"""The Mixtral model both services share: config and presets, checkpoints in the Hugging Face layout, the matmul."""
