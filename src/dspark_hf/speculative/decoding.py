"""DSpark and EAGLE-3 speculative decoding inside `target.generate()`.

[`speculative_decoding`] is a decoding loop for transformers' public `generate(custom_generate=...)` entry:
`generate()` prepares the generation config, logits processors, stopping criteria and cache, then calls the loop.
Each round the loop

1. **proposes** tokens with the proposer of the draft's family ([`DSparkProposer`], or [`Eagle3Proposer`] in
   `eagle3_proposer.py`): a drafted block, or the prefix of it that the verification policy chooses (the call's
   `verification_policy`), or (DSpark, with `prompt_lookup_num_tokens`) a continuation looked up earlier in the
   sequence;
2. **verifies** them in one target pass over anchor + proposal, which also yields the target features that extend
   the draft's context;
3. **accepts** a prefix and draws the next token by speculative sampling ([`speculative_accept`], shared with
   [`DSparkEngine`]), so greedy output is identical to plain decoding and sampled output has the target's
   distribution;
4. **rolls back** the target's cache past the rejected tokens (`Cache.crop`, recurrent states included on hybrid
   targets), then appends the new tokens one by one, checking the stopping criteria after each, streaming them
   and recording scores, logits, attentions and hidden states as plain decoding does.

`import dspark_hf` also makes `target.generate(input_ids, assistant_model=draft)` call this loop (see
`hook.py`); `target.generate(input_ids, custom_generate=speculative_decoding, draft=draft)` needs no hook.
"""

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .. import compat
from ..models.dspark.modeling_dspark import DSparkContextCache, DSparkDraftModel, target_hidden_state_indices
from ..models.eagle3.modeling_eagle3 import Eagle3DraftModel
from .eagle3_proposer import Eagle3Proposer
from .proposal import BlockProposer, Proposal
from .round import DraftBlock, draft_block, speculative_accept
from .stats import SpeculationStats

if TYPE_CHECKING:
    from ..scheduling import VerificationPolicy

# generate(..., prompt_lookup_num_tokens=N) verifies a continuation found by a 1-token match only if the draft gives
# its next token at least this probability (on SmolLM2 code prompts, the rest accepted fewer tokens than a drafted block).
DEFAULT_LOOKUP_MIN_PROBABILITY = 0.01
# How generate(..., prompt_lookup_num_tokens=N) uses a lookup match: verify the continuation instead of a drafted
# block (round level, gated by lookup_min_probability); seed the drafted block's first token with it; or verify the
# continuation of a 2-gram match and seed with a 1-token match (hybrid).
LOOKUP_MODES = ("round", "seed", "hybrid")


def prompt_lookup(
    input_ids: torch.LongTensor, num_tokens: int, max_ngram_size: int = 2, eos_token_ids: torch.Tensor | None = None
) -> torch.LongTensor | None:
    """Prompt lookup decoding's proposal: the up to `num_tokens` tokens that followed the first earlier occurrence
    of the sequence's last n-gram, for the largest n ≤ `max_ngram_size` that occurs; cut before the first EOS.

    Args:
        input_ids: `(1, length)` the sequence so far.
        eos_token_ids: `(k,)` end-of-sequence ids, or None.

    Returns:
        `(1, m)` continuation with 1 ≤ m ≤ `num_tokens`, or None when nothing is found.
    """
    sequence = input_ids[0]
    length = sequence.shape[0]
    for n in range(min(max_ngram_size, length - 1), 0, -1):
        matches = (sequence.unfold(0, n, 1) == sequence[-n:]).all(dim=-1).nonzero().flatten()
        starts = matches[matches + n < length] + n  # the suffix itself has nothing after it
        if starts.numel() == 0:
            continue
        start = int(starts[0])
        continuation = sequence[start : start + num_tokens]
        if eos_token_ids is not None:
            eos = torch.isin(continuation, eos_token_ids).nonzero()
            continuation = continuation[: int(eos[0])] if eos.numel() else continuation
        return continuation.unsqueeze(0) if continuation.numel() else None
    return None


@dataclass
class DSparkGenerateOutput(GenerateDecoderOnlyOutput):
    """What `generate(..., return_dict_in_generate=True)` returns with a DSpark or EAGLE-3 draft: plain decoding's fields
    (`sequences`, `scores`, `logits`, `attentions`, `hidden_states`, `cache`) and the call's rounds.

    Args:
        speculation_stats: proposed and accepted tokens, confidence logits and timings of every round
            ([`SpeculationStats`]).
    """

    speculation_stats: SpeculationStats | None = None


class DSparkProposer(BlockProposer):
    """Chooses the tokens each round verifies for one sequence, and keeps the draft's context of target features.

    The number of drafted tokens verified is chosen by `verification_policy` (see `dspark_hf.scheduling`); with
    none, the whole block (or what is left of `max_length`) is verified.

    With `generation_config.prompt_lookup_num_tokens` set, each round first looks for the sequence's last n-gram
    earlier in the sequence ([`prompt_lookup`], up to `max_matching_ngram_size`, default 2). A continuation that
    follows a 2-gram match is verified as it is. One that follows a 1-token match is verified only if the draft gives
    its first token a probability of at least `lookup_min_probability`; otherwise, and when the lookup finds
    nothing, the round verifies the drafted block. The choice depends on the sequence so far and the draft's logits
    only, never on a sampled token, and looked-up tokens are certain proposals, so sampled outputs keep the
    target's distribution.

    With `lookup_mode="seed"` the lookup works token by token instead: when it finds a continuation, the
    continuation's first token becomes the drafted block's first proposal and the sequential head drafts the rest of
    the block from it (its previous-token input is the looked-up token); otherwise the block is drafted as usual.
    The looked-up token is a function of the sequence so far, so its proposal distribution is one-hot at it: the
    draft's own probability of it plays no part in acceptance (it is accepted with the target's probability of it),
    and every later position is drawn from, and checked against, the head's distribution given it. So speculative
    sampling stays exact. `lookup_mode="hybrid"` verifies the continuation of a 2-gram match as a whole (as round
    mode does) and seeds the block with a 1-token match.

    Args:
        draft: an attached [`DSparkDraftModel`].
        generation_config: the call's prepared generation config (`do_sample`, `max_length`, prompt lookup).
        logits_processor: the call's processors and warpers; drafted tokens are sampled after them.
        verification_policy: how many drafted tokens each round verifies (None: the whole block).
        lookup_min_probability: the draft probability a 1-token lookup match's next token needs (round mode).
        lookup_mode: `"round"` verifies a looked-up continuation or a drafted block; `"seed"` seeds the drafted
            block's first position with the looked-up token; `"hybrid"` verifies 2-gram matches' continuations and
            seeds with 1-token matches.
    """

    def __init__(
        self,
        draft: DSparkDraftModel,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        verification_policy: "VerificationPolicy | None" = None,
        lookup_min_probability: float = DEFAULT_LOOKUP_MIN_PROBABILITY,
        lookup_mode: str = "round",
        max_draft_tokens: int | None = None,
    ):
        if lookup_mode not in LOOKUP_MODES:
            raise ValueError(f"lookup_mode must be one of {LOOKUP_MODES}, got {lookup_mode!r}.")
        if verification_policy is not None and draft.confidence_head is None:
            raise ValueError(
                f"The verification policy {type(verification_policy).__name__} needs confidences but this draft has "
                "no confidence head; pass verification_policy=None to verify whole blocks."
            )
        if max_draft_tokens is not None and max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1 (drop the draft for plain decoding), got {max_draft_tokens}.")
        super().__init__(draft, generation_config, logits_processor, verification_policy)
        self.lookup_mode = lookup_mode
        self.block_size = min(draft.config.block_size, max_draft_tokens or draft.config.block_size)
        self.lookup_tokens = generation_config.prompt_lookup_num_tokens
        self.max_matching_ngram_size = generation_config.max_matching_ngram_size or 2
        self.lookup_min_probability = lookup_min_probability
        self.cache = DSparkContextCache(draft.config.num_hidden_layers)
        self.context_length = 0

    @property
    def longest_proposal(self) -> int:
        """The most tokens a round can propose."""
        return max(self.block_size, self.lookup_tokens or 0)

    def observe(self, hidden_states: tuple[torch.Tensor, ...], count: int) -> None:
        """Appends the target features of the first `count` positions of a target pass to the draft's context.

        Args:
            hidden_states: the pass's `hidden_states` (the draft's target layers must be among them).
            count: verified positions of the pass (all but the new anchor).
        """
        features = self.target_features(hidden_states, count)
        positions = torch.arange(self.context_length, self.context_length + count, device=self.draft.device)
        self.draft.extend_context(self.cache, features, positions.unsqueeze(0))
        self.context_length += count

    def propose(self, input_ids: torch.LongTensor, budget: int) -> Proposal:
        """Tokens to verify after `input_ids` `(1, length)`, at most `budget` of them."""
        continuation = self._look_up(input_ids, budget)
        if budget <= 0:
            return Proposal(None, 0)
        if self.lookup_mode == "hybrid" and continuation is not None and self._long_match(input_ids):
            return self._looked_up(continuation)
        if self.lookup_mode in ("seed", "hybrid"):
            first = None if continuation is None else continuation[0, :1].to(self.draft.device)
            block = self._draft(input_ids, min(self.block_size, budget), first_tokens=first)
            return Proposal(block, self._verification_length(block), seeded=first is not None)
        if continuation is not None and (self.lookup_min_probability <= 0 or self._long_match(input_ids)):
            return self._looked_up(continuation)
        block = self._draft(input_ids, min(self.block_size, budget))
        if continuation is not None:
            probability = float(torch.softmax(block.logits[0, 0], dim=-1)[continuation[0, 0]])
            if probability >= self.lookup_min_probability:
                return self._looked_up(continuation)
        return Proposal(block, self._verification_length(block))

    def _draft(
        self, input_ids: torch.LongTensor, budget: int, first_tokens: torch.LongTensor | None = None
    ) -> DraftBlock:
        """A block of `budget` tokens drafted after `input_ids` `(1, length)`, whose last token is the anchor (its
        first token fixed to `first_tokens` `(1,)` if given)."""
        return draft_block(
            self.draft,
            self.cache,
            input_ids[:, -1].to(self.draft.device),
            torch.tensor([input_ids.shape[1] - 1], device=self.draft.device),
            budget,
            logits_processor=self.logits_processor,
            do_sample=self.do_sample,
            prefix_ids=input_ids,
            first_tokens=first_tokens,
        )

    def _look_up(self, input_ids: torch.LongTensor, budget: int) -> torch.LongTensor | None:
        """`(1, m)` prompt-lookup continuation of `input_ids`, at most `budget` tokens, or None when there is none."""
        if not self.lookup_tokens or budget <= 0:
            return None
        continuation = prompt_lookup(input_ids, self.lookup_tokens, self.max_matching_ngram_size, self.eos_token_ids)
        return None if continuation is None else continuation[:, :budget]

    def _looked_up(self, continuation: torch.LongTensor) -> Proposal:
        return Proposal(DraftBlock.certain(continuation, self.draft.config.vocab_size), continuation.shape[1], True)

    def _long_match(self, input_ids: torch.LongTensor) -> bool:
        """Whether the sequence's last two tokens occur earlier in it, so the lookup matched a 2-gram."""
        if self.max_matching_ngram_size < 2 or input_ids.shape[1] < 3:
            return False
        windows = input_ids[0, :-1].unfold(0, 2, 1)
        return bool((windows == input_ids[0, -2:]).all(dim=-1).any())


DRAFT_CLASSES = (DSparkDraftModel, Eagle3DraftModel)


def _check_call(model: PreTrainedModel, input_ids: torch.LongTensor, generation_config, draft, model_kwargs) -> None:
    """Refuses, with the fix in the message, what the loop cannot serve."""
    if not isinstance(draft, DRAFT_CLASSES):
        raise TypeError(
            "speculative_decoding needs the draft: call target.generate(input_ids, custom_generate=speculative_decoding, "
            f"draft=draft) with a DSparkDraftModel or an Eagle3DraftModel (got {type(draft).__name__})."
        )
    name = type(draft).__name__
    if generation_config.num_beams > 1 or generation_config.num_return_sequences > 1:
        raise ValueError(
            f"A {name} assistant supports greedy decoding and sampling only, but these settings ask for "
            f"num_beams={generation_config.num_beams}, num_return_sequences={generation_config.num_return_sequences}. "
            "Use num_beams=1 and num_return_sequences=1, or drop the draft."
        )
    if model.config.is_encoder_decoder:
        raise ValueError(f"A {name} drafts for decoder-only targets; {type(model).__name__} is an encoder-decoder model.")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"generate(assistant_model={name}) drafts for one sequence at a time, got batch size "
            f"{input_ids.shape[0]}. Loop over prompts, or use dspark_hf.DSparkEngine for batched speculative decoding."
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(f"Drafting with a {name} needs input_ids; generate() was given inputs_embeds.")
    if generation_config.prefill_chunk_size is not None:
        raise ValueError(f"Chunked prefill is not supported with a {name} (unset prefill_chunk_size).")
    cache = model_kwargs.get("cache")
    if cache is None:
        raise ValueError(f"Drafting with a {name} needs the target's cache; do not pass use_cache=False to generate().")
    if cache.get_seq_length() > 0:
        raise ValueError(
            f"Drafting with a {name} cannot continue from a filled cache: the draft needs the target features of every "
            "token. Pass the whole sequence without a cache."
        )


def make_proposer(
    draft: "DSparkDraftModel | Eagle3DraftModel",
    generation_config: GenerationConfig,
    logits_processor: LogitsProcessorList | None,
    verification_policy: "VerificationPolicy | None" = None,
    lookup_min_probability: float = DEFAULT_LOOKUP_MIN_PROBABILITY,
    lookup_mode: str = "round",
    max_draft_tokens: int | None = None,
) -> "DSparkProposer | Eagle3Proposer":
    """The proposer of `draft`'s family: [`DSparkProposer`] or [`Eagle3Proposer`] (which refuses prompt lookup)."""
    if isinstance(draft, Eagle3DraftModel):
        return Eagle3Proposer(draft, generation_config, logits_processor, verification_policy, max_draft_tokens)
    return DSparkProposer(
        draft, generation_config, logits_processor, verification_policy, lookup_min_probability, lookup_mode,
        max_draft_tokens,
    )


@dataclass
class _Outputs:
    """Per-token outputs a `return_dict_in_generate` call asked for (None where it did not)."""

    scores: tuple | None
    logits: tuple | None
    attentions: tuple | None
    hidden_states: tuple | None

    @classmethod
    def requested(cls, config: GenerationConfig) -> "_Outputs":
        wanted = bool(config.return_dict_in_generate)
        flags = (config.output_scores, config.output_logits, config.output_attentions, config.output_hidden_states)
        return cls(*(() if wanted and flag else None for flag in flags))

    def add(self, processed, raw, outputs, index: int, prefill: bool, key_length: int) -> None:
        """Records new token `index` of a target pass: its scores and logits, and the attentions and hidden states of
        the position that produced it (of every prompt position for the prefill's token), as plain decoding does."""
        if self.scores is not None:
            self.scores += (processed[:, index],)
        if self.logits is not None:
            self.logits += (raw[:, index],)
        rows = slice(None) if prefill else slice(index, index + 1)
        if self.attentions is not None and outputs.attentions and outputs.attentions[0] is not None:
            self.attentions += (tuple(a[..., rows, :key_length] for a in outputs.attentions),)
        if self.hidden_states is not None:
            self.hidden_states += (tuple(h[:, rows] for h in outputs.hidden_states),)


def _extend_model_kwargs(model_kwargs: dict, count: int) -> dict:
    """`model_kwargs` with the 2-D attention mask, position ids and token type ids grown by `count` tokens."""
    extended = dict(model_kwargs)
    if (mask := extended.get("attention_mask")) is not None:
        extended["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], count))], dim=-1)
    if (positions := extended.get("position_ids")) is not None:
        steps = torch.arange(1, count + 1, dtype=positions.dtype, device=positions.device)
        extended["position_ids"] = torch.cat([positions, positions[..., -1:] + steps], dim=-1)
    if (token_types := extended.get("token_type_ids")) is not None:
        extended["token_type_ids"] = torch.cat([token_types, token_types[:, -1:].expand(-1, count)], dim=-1)
    return extended


def _forward(model: PreTrainedModel, input_ids, model_kwargs, new_tokens: int | None, hidden_request, attentions):
    """One target pass over the last `new_tokens` of `input_ids` (the whole sequence at prefill, `new_tokens=None`)."""
    inputs = model.prepare_inputs_for_generation(
        input_ids, next_sequence_length=new_tokens, is_first_iteration=new_tokens is None, **model_kwargs
    )
    if "logits_to_keep" in inputs:
        inputs["logits_to_keep"] = 1 if new_tokens is None else new_tokens
    inputs["output_hidden_states"] = hidden_request
    if attentions:
        inputs["output_attentions"] = True
    return model(**inputs, return_dict=True)


@torch.no_grad()
def speculative_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    draft: "DSparkDraftModel | Eagle3DraftModel | None" = None,
    token_streamer: BaseStreamer | None = None,
    verification_policy: "VerificationPolicy | None" = None,
    lookup_min_probability: float = DEFAULT_LOOKUP_MIN_PROBABILITY,
    lookup_mode: str = "round",
    max_draft_tokens: int | None = None,
    **model_kwargs,
) -> "DSparkGenerateOutput | torch.LongTensor":
    """Speculative decoding with a DSpark or EAGLE-3 draft as a `generate()` decoding loop (batch size 1, greedy or
    sampling).

    Call it through `generate()`, which prepares every argument but the last two:

    ```python
    from dspark_hf import speculative_decoding
    out = target.generate(input_ids, custom_generate=speculative_decoding, draft=draft, max_new_tokens=64)
    ```

    `import dspark_hf` also routes `target.generate(input_ids, assistant_model=draft, streamer=...)` here. The
    keyword arguments below the draft go to `generate()` as they are, e.g.
    `target.generate(ids, assistant_model=draft, verification_policy=StaticThresholdPolicy(0.5))`.

    Args:
        model: the target (`generate()` passes itself).
        input_ids: `(1, length)` the prompt.
        logits_processor, stopping_criteria, generation_config: as `generate()` prepared them. Stopping criteria are
            checked after every accepted token, so the output ends exactly where plain decoding ends.
        draft: a [`DSparkDraftModel`] or an [`Eagle3DraftModel`] (attached to `model` here); its family's proposer
            ([`DSparkProposer`], [`Eagle3Proposer`]) drafts every round, the rest of the loop is the same.
        token_streamer: receives the prompt, then each round's new tokens, then `end()` (generate() does not pass
            its own `streamer` argument to a custom loop, hence the separate name).
        verification_policy: chooses how many drafted tokens each round verifies from the calibrated confidences
            (a `dspark_hf.scheduling.VerificationPolicy`; a DSpark draft needs a confidence head, an EAGLE-3 draft
            gives its own probabilities of its tokens). None verifies the whole block.
        lookup_min_probability: with `prompt_lookup_num_tokens`, the draft probability the next token of a 1-token
            lookup match needs for its continuation to be verified instead of the drafted block (0: always).
        lookup_mode: with `prompt_lookup_num_tokens`, `"round"` (default) verifies a looked-up continuation instead of
            a drafted block as above; `"seed"` makes a looked-up token the drafted block's first proposal and lets
            the sequential head draft the rest from it; `"hybrid"` verifies the continuation of a 2-gram match as a
            whole and seeds with a 1-token match (see [`DSparkProposer`]).
        model_kwargs: the cache, attention mask, position ids and other forward inputs `generate()` prepared.

    Returns:
        The sequences `(1, length + new)`, or with `return_dict_in_generate=True` a [`DSparkGenerateOutput`]: the
        fields of plain decoding's output plus the call's round statistics, `speculation_stats`.
    """
    _check_call(model, input_ids, generation_config, draft, model_kwargs)
    draft.attach(model)
    cache = model_kwargs["cache"]
    proposer = make_proposer(
        draft, generation_config, logits_processor, verification_policy, lookup_min_probability, lookup_mode,
        max_draft_tokens,
    )
    stats = SpeculationStats(block_size=proposer.longest_proposal)
    greedy = not generation_config.do_sample
    outputs_wanted = _Outputs.requested(generation_config)
    # Only the draft's layers, unless the caller wants every hidden state back.
    hidden_request = generation_config.output_hidden_states or target_hidden_state_indices(draft.config.target_layer_ids)
    attentions = bool(generation_config.output_attentions)
    max_length = generation_config.max_length
    if token_streamer is not None:
        token_streamer.put(input_ids.cpu())

    # Prefill: the prompt's features become the draft's context; its last logits give the first token.
    outputs = _forward(model, input_ids, model_kwargs, None, hidden_request, attentions)
    compat.keep_rollback_states(cache, proposer.longest_proposal + 1)
    if not cache.is_croppable:
        raise ValueError(compat.rollback_unsupported_message(model))
    proposer.observe(outputs.hidden_states, input_ids.shape[1])
    raw, processed, probs = _target_distributions(outputs, input_ids, input_ids.shape[1], logits_processor, greedy)
    _, first = speculative_accept(probs, None, torch.zeros(1, dtype=torch.long, device=probs.device), _flag(greedy, probs.device))
    input_ids, done = _append(input_ids, first[:, None], stopping_criteria, outputs_wanted, token_streamer,
                              processed, raw, outputs, prefill=True)
    model_kwargs = _extend_model_kwargs(model_kwargs, 1)

    while not done and input_ids.shape[1] < max_length:
        started = time.perf_counter()
        length = input_ids.shape[1]
        proposal = proposer.propose(input_ids, budget=max_length - length - 1)
        n = proposal.length
        candidates = input_ids if n == 0 else torch.cat([input_ids, proposal.block.tokens[:, :n]], dim=-1)
        proposed = time.perf_counter()

        outputs = _forward(model, candidates, _extend_model_kwargs(model_kwargs, n), n + 1, hidden_request, attentions)
        raw, processed, probs = _target_distributions(outputs, candidates, length, logits_processor, greedy)
        lengths = torch.tensor([n], device=raw.device)
        accepted, next_token = speculative_accept(probs, proposal.block, lengths, _flag(greedy, raw.device))
        m = int(accepted)
        # Roll back the rejected tokens; crop(0) still lets hybrid layers drop the states they kept for rollback.
        cache.crop(-(n - m))
        proposer.observe(outputs.hidden_states, m + 1)
        new_tokens = torch.cat([candidates[:, length : length + m], next_token[:, None]], dim=-1)
        input_ids, done = _append(input_ids, new_tokens, stopping_criteria, outputs_wanted, token_streamer,
                                  processed, raw, outputs, prefill=False)
        kept = input_ids.shape[1] - length
        if kept < m + 1:  # a stopping criterion fired inside the round: the cache holds no token past the end
            cache.crop(-(m + 1 - kept))
        model_kwargs = _extend_model_kwargs(model_kwargs, kept)
        stats.record_round(
            n, kept - 1, proposal.confidence_logits, looked_up=proposal.looked_up, seeded=proposal.seeded
        )
        stats.draft_time_s += proposed - started
        stats.verify_time_s += time.perf_counter() - proposed

    if token_streamer is not None:
        token_streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    return DSparkGenerateOutput(
        sequences=input_ids,
        scores=outputs_wanted.scores,
        logits=outputs_wanted.logits,
        attentions=outputs_wanted.attentions,
        hidden_states=outputs_wanted.hidden_states,
        cache=cache,
        speculation_stats=stats,
    )


def _flag(greedy: bool, device: torch.device) -> torch.BoolTensor:
    return torch.tensor([greedy], device=device)


def _target_distributions(outputs, sequence: torch.LongTensor, length: int, logits_processor, greedy: bool):
    """The target's next-token logits after `sequence[:, :length]` and after each later token of `sequence`
    `(1, q, V)` each: raw, processed, and as probabilities (one-hot at the argmax when greedy)."""
    q = sequence.shape[1] - length + 1
    raw = outputs.logits[:, -q:].to(dtype=torch.float32, device=sequence.device)
    processed = raw
    if logits_processor:
        processed = torch.stack(
            [logits_processor(sequence[:, : length + i], raw[:, i].clone()) for i in range(q)], dim=1
        )
    if greedy:
        return raw, processed, torch.zeros_like(processed).scatter_(-1, processed.argmax(dim=-1, keepdim=True), 1.0)
    return raw, processed, torch.softmax(processed, dim=-1)


def _append(input_ids, new_tokens, stopping_criteria, outputs_wanted, streamer, processed, raw, outputs, prefill: bool):
    """Appends `new_tokens` `(1, k)` one at a time until a stopping criterion fires; returns (sequence, stopped)."""
    length = input_ids.shape[1]
    extended = torch.cat([input_ids, new_tokens], dim=-1)
    kept, stopped = new_tokens.shape[1], False
    for i in range(new_tokens.shape[1]):
        outputs_wanted.add(processed, raw, outputs, i, prefill, length + i)
        if bool(stopping_criteria(extended[:, : length + i + 1], outputs_wanted.scores).any()):
            kept, stopped = i + 1, True
            break
    if streamer is not None:
        streamer.put(new_tokens[:, :kept].cpu())
    return extended[:, : length + kept], stopped
