"""The sequential heads (Markov, gated Markov, RNN; paper §3.1) and the confidence head (paper eq. 7) of a DSpark
draft."""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_dspark import DSparkDraftConfig


class DSparkMarkovHead(nn.Module):
    """First-order transition bias B(x_{k−1}, ·) = W1[x_{k−1}] W2 (paper eq. 5)."""

    def __init__(self, config: DSparkDraftConfig):
        super().__init__()
        self.markov_w1 = nn.Embedding(config.vocab_size, config.markov_rank)
        self.markov_w2 = nn.Linear(config.markov_rank, config.vocab_size, bias=False)

    def token_features(self, prev_ids: torch.LongTensor) -> torch.Tensor:
        """W1[x_{k−1}]: `(...,)` → `(..., r)`; also the confidence head's Markov feature."""
        return self.markov_w1(prev_ids)

    def step(
        self,
        prev_ids: torch.LongTensor,
        hidden: torch.Tensor,
        state: torch.Tensor | None,
        output_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One position: prev `(batch,)`, hidden `(batch, d)` → bias `(batch, V)`, next state (unused: None).

        `output_weight` `(V', r)` replaces W2 (e.g. its draft-vocabulary rows), giving a `(batch, V')` bias.
        """
        return self.project(self.markov_w1(prev_ids), output_weight), None

    def project(self, features: torch.Tensor, output_weight: torch.Tensor | None = None) -> torch.Tensor:
        """`(..., r)` → `(..., V)` through W2, or `(..., V')` through `output_weight`."""
        return F.linear(features, self.markov_w2.weight if output_weight is None else output_weight)

    def teacher_forced(
        self, prev_ids: torch.LongTensor, hidden: torch.Tensor, output_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All positions at once: prev `(..., γ)`, hidden `(..., γ, d)` → bias `(..., γ, V)` (`(..., γ, V')` with
        `output_weight`)."""
        return self.project(self.markov_w1(prev_ids), output_weight)


class DSparkGatedMarkovHead(DSparkMarkovHead):
    """Markov transition gated per rank by the hidden state: B_k = W2(σ(G[h_k ; W1[x_{k−1}]]) ⊙ W1[x_{k−1}])."""

    def __init__(self, config: DSparkDraftConfig):
        super().__init__(config)
        self.gate_proj = nn.Linear(config.hidden_size + config.markov_rank, config.markov_rank)

    def gated_features(self, prev_ids: torch.LongTensor, hidden: torch.Tensor) -> torch.Tensor:
        """prev `(...,)`, hidden `(..., d)` → gated features `(..., r)`."""
        token = self.markov_w1(prev_ids)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden.to(token.dtype), token], dim=-1)))
        return gate * token

    def step(
        self,
        prev_ids: torch.LongTensor,
        hidden: torch.Tensor,
        state: torch.Tensor | None,
        output_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        return self.project(self.gated_features(prev_ids, hidden), output_weight), None

    def teacher_forced(
        self, prev_ids: torch.LongTensor, hidden: torch.Tensor, output_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.project(self.gated_features(prev_ids, hidden), output_weight)


class DSparkRNNHead(DSparkMarkovHead):
    """Gated recurrent state over the in-block prefix (paper eq. 6)."""

    def __init__(self, config: DSparkDraftConfig):
        super().__init__(config)
        self.rank = config.markov_rank
        self.rnn_proj = nn.Linear(2 * config.markov_rank + config.hidden_size, 3 * config.markov_rank)

    def step(
        self,
        prev_ids: torch.LongTensor,
        hidden: torch.Tensor,
        state: torch.Tensor | None,
        output_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token = self.markov_w1(prev_ids)
        if state is None:
            state = token.new_zeros(*token.shape[:-1], self.rank)
        gate, candidate, output = self.rnn_proj(torch.cat([state, token, hidden.to(token.dtype)], dim=-1)).chunk(3, -1)
        gate = torch.sigmoid(gate)
        new_state = gate * state + (1 - gate) * torch.tanh(candidate)
        return self.project(torch.tanh(output), output_weight), new_state

    def teacher_forced(
        self, prev_ids: torch.LongTensor, hidden: torch.Tensor, output_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        state, biases = None, []
        for k in range(prev_ids.shape[-1]):
            bias, state = self.step(prev_ids[..., k], hidden[..., k, :], state, output_weight)
            biases.append(bias)
        return torch.stack(biases, dim=-2)


class DSparkConfidenceHead(nn.Module):
    """c_k = σ(wᵀ[h_k ; W1[x_{k−1}]]) (paper eq. 7), or σ(wᵀh_k) without the previous-token feature; returns the
    logit, before the sigmoid."""

    def __init__(self, config: DSparkDraftConfig):
        super().__init__()
        extra = config.markov_rank if config.has_sequential_head and config.confidence_head_with_markov else 0
        self.proj = nn.Linear(config.hidden_size + extra, 1)

    def forward(self, hidden: torch.Tensor, token_features: torch.Tensor | None) -> torch.Tensor:
        if token_features is not None:
            hidden = torch.cat([hidden, token_features.to(hidden.dtype)], dim=-1)
        return self.proj(hidden).squeeze(-1)
