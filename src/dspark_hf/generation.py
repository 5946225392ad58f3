"""DSpark drafting for `target.generate(input_ids, assistant_model=draft)`.

[`DSparkCandidateGenerator`] follows transformers' `CandidateGenerator` protocol with `requires_model_outputs`: after
each verification pass it receives the target's outputs, appends the hidden states of the newly verified tokens to
the draft's context cache, runs the backbone once over anchor + γ−1 masks, samples left to right through the
sequential head, scores each position with the confidence head and lets a verification policy choose how many
tokens to send to the target. With `prompt_lookup_num_tokens` also set, a round verifies transformers' prompt-lookup
continuation instead when it follows a 2-gram match, or a 1-token match whose next token the draft finds likely
enough. The hook that makes `generate()` pick it lives in `generate_hook.py`.
"""

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator, PromptLookupCandidateGenerator
from transformers.generation.logits_process import LogitsProcessorList

from .modeling_dspark import DSparkContextCache, DSparkDraftModel
from .stats import SpeculationStats


@dataclass
class DraftBlock:
    """One drafted block.

    Args:
        tokens: `(batch, n)` drafted tokens x_1..x_n.
        logits: `(batch, n, vocab)` float32 logits each token was sampled from (after logits processors).
        confidence_logits: `(batch, n)` raw confidence-head logits, or None without a confidence head.
        confidences: `(batch, n)` calibrated conditional survival probabilities c_k, or None.
    """

    tokens: torch.LongTensor
    logits: torch.FloatTensor
    confidence_logits: torch.FloatTensor | None
    confidences: torch.FloatTensor | None


@torch.no_grad()
def sample_block(
    draft: DSparkDraftModel,
    hidden_states: torch.Tensor,
    anchor_ids: torch.LongTensor,
    prefix_ids: torch.LongTensor | None = None,
    logits_processor: LogitsProcessorList | None = None,
    do_sample: bool = False,
) -> DraftBlock:
    """Samples a block left to right: p_k = softmax(process(U_k + B_k(prefix))) (paper eq. 4).

    A draft with a draft vocabulary (`draft.set_draft_vocabulary`) samples among its tokens only: the returned
    logits are −inf elsewhere, so they still are exactly the distributions the tokens were drawn from.

    Args:
        hidden_states: `(batch, n, d)` backbone states of the first n block positions.
        anchor_ids: `(batch,)` anchor tokens x_0.
        prefix_ids: `(batch, len)` the sequence so far (ending with the anchor), given to `logits_processor`.
        logits_processor: transformers processors/warpers applied to each position's logits before sampling, so
            that every drafted token is sampled from exactly the distribution returned in `DraftBlock.logits`.
        do_sample: sample (True) or take the argmax (False).
    """
    # With a draft vocabulary, logits are computed for its tokens only and the rest of the vocabulary gets −inf.
    vocab_ids = draft.draft_vocab_ids
    base_logits = draft.compute_logits(hidden_states, draft_vocabulary=True).float()
    head = draft.markov_head
    head_weight = draft.sequential_head_output_weight()
    prev, state = anchor_ids, None
    tokens, logits, confidence_logits = [], [], []
    for k in range(hidden_states.shape[1]):
        step_logits = base_logits[:, k]
        if head is not None:
            bias, state = head.step(prev, hidden_states[:, k], state, output_weight=head_weight)
            step_logits = step_logits + bias.float()
        if vocab_ids is not None:
            full = step_logits.new_full((step_logits.shape[0], draft.config.vocab_size), float("-inf"))
            step_logits = full.index_copy_(1, vocab_ids, step_logits)
        if draft.confidence_head is not None:
            confidence_logits.append(draft.confidence_head(hidden_states[:, k], draft.previous_token_features(prev)))
        if logits_processor:
            sequence = prev.unsqueeze(-1) if prefix_ids is None else prefix_ids
            step_logits = logits_processor(torch.cat([sequence, *[t.unsqueeze(-1) for t in tokens]], dim=-1), step_logits)
        if do_sample:
            prev = torch.multinomial(torch.softmax(step_logits, dim=-1), num_samples=1).squeeze(-1)
        else:
            prev = step_logits.argmax(dim=-1)
        tokens.append(prev)
        logits.append(step_logits)
    raw = torch.stack(confidence_logits, dim=1).float() if confidence_logits else None
    return DraftBlock(
        tokens=torch.stack(tokens, dim=1),
        logits=torch.stack(logits, dim=1),
        confidence_logits=raw,
        confidences=None if raw is None else draft.calibrated_confidence(raw),
    )


class DSparkCandidateGenerator(CandidateGenerator):
    """Drafts candidates for transformers' assisted-decoding loop with a [`DSparkDraftModel`] (batch size 1).

    The number of tokens verified each round is chosen by `draft.verification_policy` (see `dspark_hf.scheduling`);
    with none set, the whole block is verified. Statistics of the call are kept in `draft.last_generate_stats`.

    With `generation_config.prompt_lookup_num_tokens` set, each round first looks for the sequence's last n-gram
    earlier in the sequence (transformers' prompt lookup, `max_matching_ngram_size`). A continuation that follows a
    2-gram match is verified as it is. One that follows a 1-token match is verified only if the draft gives its first
    token a probability of at least `draft.lookup_min_probability`; otherwise, and when the lookup finds nothing, the
    round verifies the drafted block. The choice depends on the sequence so far and the draft's logits only, never on
    a sampled token, and looked-up tokens are certain proposals, so sampled outputs keep the target's distribution.
    """

    requires_model_outputs = True

    def __init__(
        self,
        target: PreTrainedModel,
        draft: DSparkDraftModel,
        input_ids: torch.LongTensor,
        generation_config,
        logits_processor: LogitsProcessorList | None = None,
    ):
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"generate(assistant_model=DSparkDraftModel) drafts for one sequence at a time, got batch size "
                f"{input_ids.shape[0]}. Loop over prompts, or use dspark_hf.DSparkEngine for batched speculative decoding."
            )
        draft.attach(target)
        self.draft = draft
        self.block_size = draft.config.block_size
        self.mask_token_id = draft.config.mask_token_id
        # Ask the target only for the layers the draft needs, unless the caller wants every hidden state back.
        selected = [i + 1 for i in draft.config.target_layer_ids]
        self.model_kwargs_overrides = {"output_hidden_states": True if generation_config.output_hidden_states else selected}
        self.max_length = generation_config.max_length
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.policy = getattr(draft, "verification_policy", None)
        if self.policy is not None and draft.confidence_head is None:
            raise ValueError(
                f"The verification policy {type(self.policy).__name__} needs confidences but this draft has no "
                "confidence head; set draft.verification_policy = None to verify whole blocks."
            )
        if self.policy is not None:  # stateful policies (lagged scheduler) start each call afresh
            self.policy.reset()
        self.lookup = None
        self.max_matching_ngram_size = generation_config.max_matching_ngram_size or 2
        self.lookup_min_probability = draft.lookup_min_probability
        if generation_config.prompt_lookup_num_tokens is not None:
            # No logits processor: a looked-up token the target forbids simply fails verification.
            self.lookup = PromptLookupCandidateGenerator(
                eos_token_id=generation_config._eos_token_tensor,
                num_output_tokens=generation_config.prompt_lookup_num_tokens,
                max_matching_ngram_size=self.max_matching_ngram_size,
                max_length=generation_config.max_length,
            )
        self.cache = DSparkContextCache(draft.config.num_hidden_layers)
        self.context_length = 0
        longest = max(self.block_size, generation_config.prompt_lookup_num_tokens or 0)
        self.stats = SpeculationStats(block_size=longest)
        self.longest_proposal = longest
        draft.last_generate_stats = self.stats
        self._pending_round: tuple[int, list[float], bool] | None = None
        self._verify_started = 0.0

    @property
    def num_drafting_tokens(self) -> int:
        """Per-token recurrent states a hybrid (linear-attention) target cache keeps for rollback (transformers ≥ 5.25):
        a verification pass feeds the anchor plus at most `longest_proposal` tokens, so one more than the longest
        proposal, or a round that rejects everything would roll the recurrent state back one token too far."""
        return self.longest_proposal + 1

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict | None = None,
        model_outputs=None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """Returns `input_ids` extended by the tokens to verify (a drafted block's prefix or a looked-up continuation)
        and the drafted tokens' logits (None for looked-up tokens)."""
        if is_first_iteration:  # the target has not prefilled yet: propose nothing
            return input_ids, None
        started = time.perf_counter()
        self._extend_context(input_ids, model_outputs)
        budget = self.max_length - input_ids.shape[1] - 1
        continuation, tokens, logits, confidences = self._look_up(input_ids, budget), None, None, []
        looked_up = continuation is not None and (self.lookup_min_probability <= 0 or self._long_match(input_ids))
        if not looked_up and budget > 0:
            block_budget = min(self.block_size, budget)
            block = self._draft(input_ids, block_budget)
            probability = None if continuation is None else self._draft_probability(block, continuation)
            looked_up = probability is not None and probability >= self.lookup_min_probability
            if not looked_up:
                length = self._verification_length(block, block_budget)
                tokens, logits = block.tokens[:, :length], block.logits[:, :length]
                if block.confidence_logits is not None:
                    confidences = block.confidence_logits[0, :length].tolist()
        if looked_up:
            tokens = continuation
        proposed = 0 if tokens is None else tokens.shape[1]
        self._pending_round = (proposed, confidences, looked_up)
        self.stats.draft_time_s += time.perf_counter() - started
        self._verify_started = time.perf_counter()
        if proposed == 0:
            return input_ids, None
        # Looked-up tokens come without logits: transformers then checks them against tokens the target picks itself.
        return torch.cat([input_ids, tokens], dim=-1), logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        """Records the round's outcome (called by transformers after each verification)."""
        if self._pending_round is None:  # the prefill pass
            return
        self.stats.verify_time_s += time.perf_counter() - self._verify_started
        proposed, confidence_logits, looked_up = self._pending_round
        self.stats.record_round(proposed, int(num_matches), confidence_logits, looked_up=looked_up)
        self._pending_round = None

    def _look_up(self, input_ids: torch.LongTensor, budget: int) -> torch.LongTensor | None:
        """`(1, m)` prompt-lookup continuation of `input_ids`, at most `budget` tokens, or None when there is none."""
        if self.lookup is None or budget <= 0:
            return None
        candidates, _ = self.lookup.get_candidates(input_ids)
        continuation = candidates[:, input_ids.shape[1] : input_ids.shape[1] + budget]
        return continuation if continuation.shape[1] else None

    def _long_match(self, input_ids: torch.LongTensor) -> bool:
        """Whether the sequence's last two tokens occur earlier in it, so the lookup matched a 2-gram."""
        if self.max_matching_ngram_size < 2 or input_ids.shape[1] < 3:
            return False
        windows = input_ids[0, :-1].unfold(0, 2, 1)
        return bool((windows == input_ids[0, -2:]).all(dim=-1).any())

    @staticmethod
    def _draft_probability(block: DraftBlock, continuation: torch.LongTensor) -> float:
        """The draft's probability of the looked-up continuation's first token."""
        return float(torch.softmax(block.logits[0, 0], dim=-1)[continuation[0, 0]])

    def _extend_context(self, input_ids: torch.LongTensor, model_outputs) -> None:
        """Appends target features of every verified token that the draft has not seen (all but the anchor)."""
        new = input_ids.shape[1] - 1 - self.context_length
        if new <= 0:
            return
        hidden_states = getattr(model_outputs, "hidden_states", None)
        if hidden_states is None or hidden_states[self.draft.config.target_layer_ids[0] + 1] is None:
            raise ValueError("The target's outputs carry no hidden states; DSpark needs them to draft.")
        available = hidden_states[self.draft.config.target_layer_ids[0] + 1].shape[1]
        if available < new:
            raise ValueError(
                f"The target returned hidden states for {available} positions but {new} are new; chunked prefill is not "
                "supported with a DSpark draft (unset prefill_chunk_size)."
            )
        features = torch.cat([hidden_states[i + 1][:, :new] for i in self.draft.config.target_layer_ids], dim=-1)
        positions = torch.arange(self.context_length, self.context_length + new, device=input_ids.device)
        self.draft.extend_context(self.cache, features.to(self.draft.device), positions.unsqueeze(0))
        self.context_length += new

    @torch.no_grad()
    def _draft(self, input_ids: torch.LongTensor, budget: int) -> DraftBlock:
        anchor_position = input_ids.shape[1] - 1
        block_ids = torch.full((1, self.block_size), self.mask_token_id, dtype=torch.long, device=input_ids.device)
        block_ids[:, 0] = input_ids[:, -1]
        position_ids = torch.arange(anchor_position, anchor_position + self.block_size, device=input_ids.device)
        hidden = self.draft(block_ids, position_ids.unsqueeze(0), cache=self.cache, compute_logits=False).hidden_states
        return sample_block(
            self.draft,
            hidden[:, :budget],
            input_ids[:, -1],
            prefix_ids=input_ids,
            logits_processor=self.logits_processor,
            do_sample=self.do_sample,
        )

    def _verification_length(self, block: DraftBlock, budget: int) -> int:
        if self.policy is None:
            return budget
        lengths = self.policy.select_lengths([block.confidences[0].tolist()], max_lengths=[budget])
        return min(budget, int(lengths[0]))
