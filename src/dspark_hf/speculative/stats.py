"""Per-call statistics of speculative decoding rounds."""

from dataclasses import dataclass, field


@dataclass
class SpeculationStats:
    """What happened in the drafting/verification rounds of one generation.

    A round is one target verification pass after the prefill. `proposed[i]` tokens were sent for verification in
    round `i`, `accepted[i]` of them survived; the target adds one more token (bonus or correction) every round.
    `confidence_logits[i]` holds the raw confidence-head logits of the verified positions (for calibration).
    `looked_up[i]` says whether round `i` verified a prompt-lookup continuation (`prompt_lookup_num_tokens`) rather
    than a drafted block; such rounds carry no confidence logits, and `block_size` is the longest proposal allowed.
    `seeded[i]` says whether round `i`'s drafted block started with a looked-up token (`lookup_mode="seed"`); its
    first confidence logit scores the draft's own token, not the one verified.
    """

    block_size: int
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    confidence_logits: list[list[float]] = field(default_factory=list)
    looked_up: list[bool] = field(default_factory=list)
    seeded: list[bool] = field(default_factory=list)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    def record_round(
        self,
        proposed: int,
        accepted: int,
        confidence_logits: list[float] | None = None,
        looked_up: bool = False,
        seeded: bool = False,
    ) -> None:
        if not 0 <= accepted <= proposed:
            raise ValueError(f"accepted ({accepted}) must lie in [0, proposed={proposed}].")
        self.proposed.append(proposed)
        self.accepted.append(accepted)
        self.confidence_logits.append(list(confidence_logits or []))
        self.looked_up.append(looked_up)
        self.seeded.append(seeded)

    @classmethod
    def merge(cls, parts: "list[SpeculationStats]") -> "SpeculationStats":
        """The rounds of several calls as one record (the largest block size among them)."""
        if not parts:
            raise ValueError("merge needs at least one SpeculationStats.")
        merged = cls(block_size=max(p.block_size for p in parts))
        for part in parts:
            merged.proposed += part.proposed
            merged.accepted += part.accepted
            merged.confidence_logits += part.confidence_logits
            merged.looked_up += part.looked_up
            merged.seeded += part.seeded
            merged.draft_time_s += part.draft_time_s
            merged.verify_time_s += part.verify_time_s
        return merged

    @property
    def num_rounds(self) -> int:
        return len(self.proposed)

    @property
    def tau(self) -> float:
        """Mean tokens gained per round, the target's bonus/correction token included."""
        return (sum(self.accepted) + self.num_rounds) / self.num_rounds if self.num_rounds else 0.0

    def conditional_acceptance(self) -> list[float | None]:
        """P(position k accepted | positions < k accepted and k was proposed), k = 1..γ (paper Fig. 2)."""
        reached = [0] * self.block_size
        survived = [0] * self.block_size
        for proposed, accepted in zip(self.proposed, self.accepted, strict=True):
            for k in range(min(proposed, accepted + 1)):
                reached[k] += 1
                survived[k] += int(k < accepted)
        return [s / r if r else None for s, r in zip(survived, reached, strict=True)]

    def prefix_survival(self) -> list[float | None]:
        """P(positions 1..k all accepted) over rounds that proposed at least k tokens, k = 1..γ."""
        result = []
        for k in range(1, self.block_size + 1):
            rounds = [a for p, a in zip(self.proposed, self.accepted, strict=True) if p >= k]
            result.append(sum(a >= k for a in rounds) / len(rounds) if rounds else None)
        return result

    def as_dict(self) -> dict:
        return {
            "num_rounds": self.num_rounds,
            "tau": self.tau,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "conditional_acceptance": self.conditional_acceptance(),
            "prefix_survival": self.prefix_survival(),
            "looked_up_rounds": sum(self.looked_up),
            "seeded_rounds": sum(self.seeded),
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
        }
