"""An attention shard: engine, scheduler, paged KV cache and attention, sampler, tokenizer, expert transports; runs without Ray."""
