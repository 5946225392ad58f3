"""Verification-length scheduling: the SPS cost table and its profiler, the policies behind one interface,
the hardware-aware prefix scheduler (paper Algorithm 1, §3.2.2), its lagged production variant (§5.2) and a
Monte-Carlo reproduction of the Appendix A counterexample.

Vocabulary (paper notation, positions 1-based):

- `confidences[r][j]` is the calibrated *conditional* confidence c_{r,j+1}: the probability that drafted token
  j+1 of request r is accepted given that its prefix was. c_{r,k} is computed from x_{r,k-1}, never from x_{r,k}.
- survival a_{r,k} = ∏_{i≤k} c_{r,i}, the probability that the first k drafted tokens are all accepted.
- A verification length ℓ_r sends the anchor plus ℓ_r drafted tokens of request r to the target, so one forward
  over R requests holds B = Σ_r (1 + ℓ_r) tokens and is expected to yield τ = Σ_r (1 + Σ_{k≤ℓ_r} a_{r,k}) tokens.
- SPS(B) is the number of target forwards per second at B tokens; Θ = τ · SPS(B) is the expected token throughput.
  A cost table may also hold the time of one draft pass over R requests, d(R); Θ then becomes τ / (1/SPS(B) + d(R))
  (an extension for verifiers whose draft pass is not negligible, e.g. on CPU; without it Θ is the paper's).
- Layout: the paper's verifier packs the R requests' tokens (B = Σ_r (1 + ℓ_r)). A padded verifier, like the
  `DSparkEngine` over a transformers KV cache, computes R · (1 + max_r ℓ_r) tokens; `layout="padded"` schedules
  for that cost.

Losslessness: speculative decoding recovers the target distribution exactly only if the event ℓ_r ≥ k is decided
without looking at x_{r,k} (the non-anticipating property). Every policy states whether it has it
(`policy.lossless`).

Modules: `cost_table` (the SPS table), `profiling` (measuring it), `throughput` (survival, Θ and the length
searches), `policies` (the policies and `schedule_verification_lengths`), `simulation` (Appendix A) and `plots`.
"""

from .cost_table import COST_TABLE_FORMAT, COST_TABLE_VERSION, SMOOTHING_MODES, CostTable
from .plots import plot_cost_table
from .policies import (
    POLICY_NAMES,
    FullBlockPolicy,
    GlobalSearchPolicy,
    LaggedSchedulerPolicy,
    NoSpeculationPolicy,
    PrefixSchedulerPolicy,
    StaticThresholdPolicy,
    VerificationPolicy,
    make_policy,
    schedule_verification_lengths,
)
from .profiling import (
    interleaved_median_times,
    profile_cost_table,
    profile_draft_cost,
    profile_verify_cost,
    synchronize,
)
from .simulation import appendix_a_cost_table, appendix_a_simulation
from .throughput import (
    LAYOUTS,
    MAX_BRUTE_FORCE_CANDIDATES,
    Confidences,
    brute_force_best_lengths,
    expected_throughput,
    survival_probabilities,
)

__all__ = [
    "COST_TABLE_FORMAT",
    "COST_TABLE_VERSION",
    "Confidences",
    "CostTable",
    "FullBlockPolicy",
    "GlobalSearchPolicy",
    "LAYOUTS",
    "LaggedSchedulerPolicy",
    "MAX_BRUTE_FORCE_CANDIDATES",
    "NoSpeculationPolicy",
    "POLICY_NAMES",
    "PrefixSchedulerPolicy",
    "SMOOTHING_MODES",
    "StaticThresholdPolicy",
    "VerificationPolicy",
    "appendix_a_cost_table",
    "appendix_a_simulation",
    "brute_force_best_lengths",
    "expected_throughput",
    "interleaved_median_times",
    "make_policy",
    "plot_cost_table",
    "profile_cost_table",
    "profile_draft_cost",
    "profile_verify_cost",
    "schedule_verification_lengths",
    "survival_probabilities",
    "synchronize",
]
