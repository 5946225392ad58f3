"""Paper Appendix A by Monte Carlo: first-token distribution under each verification policy.

The target is (0.7, 0.3). A lossless policy reproduces it; the global search without early stop shifts it to
about (0.85, 0.15). Writes benchmarks/results/appendix_a.{json,md}.

    python benchmarks/appendix_a.py --trials 100000
"""

import argparse
import json
import math
from pathlib import Path

from dspark_hf.scheduling import appendix_a_simulation

RESULTS = Path(__file__).parent / "results"
POLICIES = ("global", "prefix", "lagged", "threshold", "full", "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    standard_error = math.sqrt(0.7 * 0.3 / args.trials)
    rows = []
    for policy in POLICIES:
        kwargs = {"threshold": 0.5} if policy == "threshold" else {}
        p_a, p_b = appendix_a_simulation(policy, num_trials=args.trials, seed=args.seed, **kwargs).tolist()
        rows.append({"policy": policy, "P(A)": p_a, "P(B)": p_b, "z_vs_target": (p_a - 0.7) / standard_error})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "appendix_a.json").write_text(json.dumps({"trials": args.trials, "seed": args.seed, "rows": rows}, indent=2))
    lines = [f"# Appendix A by Monte Carlo ({args.trials} trials, seed {args.seed}; target (0.7, 0.3))", "",
             "| policy | P(A) | P(B) | (P(A) − 0.7) / s.e. |", "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['P(A)']:.3f} | {r['P(B)']:.3f} | {r['z_vs_target']:+.1f} |" for r in rows]
    (RESULTS / "appendix_a.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
