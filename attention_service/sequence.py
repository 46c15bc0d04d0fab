"""One request's tokens and where they stand: what is cached, what is generated."""

import enum
import hashlib
import itertools
import time

from attention_service.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded with `seed`: choice 0 keeps it, so a
    request's first choice is what the same request with n = 1 gives."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()) >> 1


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, seed: int | None = None, index: int = 0):
        self.seq_id = next(_ids)
        self.index = index               # which of the request's choices (best_of candidates) this is
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        # Unseeded requests still get a seed of their own: sampling is then a pure function
        # of (seed, tokens generated so far), so preemption and recompute change nothing.
        if seed is None:
            seed = hash((self.seq_id, time.time_ns()))
        self.seed = choice_seed(params.seed, index) if params.seed is not None else seed
        # A request's choices, this one first (only the first holds them). The others wait
        # in `followers` until this one has computed the prompt, then start on its blocks.
        self.choices: list[Sequence] = [self]
        self.followers: list[Sequence] = []
        self.num_computed = 0            # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []   # names of its full, computed blocks (prefix caching)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None    # why it finished with "error"
        self.arrival = time.monotonic()
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.cumulative_logprob = 0.0    # of its output tokens, kept when the request ranks its choices (best_of)
        self.trace_context = None        # the request's OpenTelemetry context, when it is sampled
        self.grammar = None              # its grammar.GrammarMatcher, when its output is constrained

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")
