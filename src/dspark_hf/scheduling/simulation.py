"""Monte-Carlo reproduction of the paper's Appendix A counterexample: a scheduler that looks at the confidence after
a drafted token before admitting it biases the output distribution."""

import copy

import torch

from .cost_table import CostTable
from .policies import VerificationPolicy, make_policy


def appendix_a_cost_table() -> CostTable:
    """The capacity curve of the paper's counterexample: SPS(1) = 1.0, SPS(2) = 0.5, SPS(3) = 0.45."""
    return CostTable([1, 2, 3], [1.0, 0.5, 0.45])


def appendix_a_simulation(
    policy: str | VerificationPolicy = "global", num_trials: int = 20_000, seed: int = 0, **policy_kwargs
) -> torch.Tensor:
    """Monte-Carlo distribution of the first emitted token in the paper's Appendix A counterexample.

    One request, γ = 2, vocabulary {A, B}, target (0.7, 0.3), draft (0.5, 0.5), c_1 = 0.8, and c_2 = 0.9 after
    x_1 = A, 0 after x_1 = B; cost table `appendix_a_cost_table()`. Each trial draws x_1 in the current round and
    in `lag` earlier rounds (stateful policies see those rounds first), asks the policy for ℓ, then runs
    speculative sampling on the first token: if ℓ ≥ 1, x_1 is accepted with probability min(1, p_t/p_d) and
    otherwise replaced by a draw from norm(max(0, p_t − p_d)); if ℓ = 0 the target samples the token itself.

    Returns a float64 tensor `[P(A), P(B)]`. A lossless policy gives (0.7, 0.3) up to sampling error, the global
    search gives (0.85, 0.15). The policy is run on every distinct round history once and the trials are sampled
    vectorized, so 10^5 trials take milliseconds.
    """
    target = torch.tensor([0.7, 0.3], dtype=torch.float64)
    draft = torch.tensor([0.5, 0.5], dtype=torch.float64)
    table = appendix_a_cost_table()

    def fresh_policy() -> VerificationPolicy:
        if isinstance(policy, VerificationPolicy):
            return copy.deepcopy(policy)
        return make_policy(policy, table, **policy_kwargs)

    rounds = getattr(fresh_policy(), "lag", 0) + 1
    decided = []  # ℓ of the last round for every history of first tokens; token i of round t is bit t of the code
    for code in range(2**rounds):
        scheduler = fresh_policy()
        for t in range(rounds):
            length = scheduler.select_lengths([[0.8, 0.9 if (code >> t) & 1 == 0 else 0.0]])[0]
        decided.append(length)

    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(draft, num_trials * rounds, replacement=True, generator=generator).view(
        num_trials, -1
    )
    codes = (draws << torch.arange(rounds)).sum(dim=1)
    admitted = torch.tensor(decided)[codes] >= 1
    token = draws[:, -1]
    accepted = (
        torch.rand(num_trials, generator=generator, dtype=torch.float64)
        < (target / draft).clamp(max=1)[token]
    )
    residual = (target - draft).clamp(min=0)
    resampled = torch.multinomial(
        residual / residual.sum(), num_trials, replacement=True, generator=generator
    )
    fresh = torch.multinomial(target, num_trials, replacement=True, generator=generator)
    output = torch.where(admitted, torch.where(accepted, token, resampled), fresh)
    return torch.bincount(output, minlength=2).to(torch.float64) / num_trials
