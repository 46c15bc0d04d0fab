"""An attention shard: engine, scheduler, paged KV cache and attention, sampler, tokenizer and
the transports that reach the experts; runs without Ray."""
