#!/usr/bin/env python
"""Time one ``mergekit-yaml`` config in process with the code of a given checkout.

For same-run comparisons of two revisions (run it once per checkout, alternating, on an
otherwise idle core): ``run_merge`` wall time, the seconds inside ``solve_lore`` and its
outer steps per matrix. The checkout's ``mergekit_lore`` is imported ahead of the installed one.

    git worktree add /tmp/old OLD_REV
    for repo in /tmp/old . /tmp/old .; do
        OMP_NUM_THREADS=1 python bench/ab_inprocess.py --repo $repo --config CONFIG.yml
    done
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="checkout whose mergekit_lore to time")
    parser.add_argument("--config", required=True, help="a mergekit-yaml config (absolute model paths)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.repo).resolve()))
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_lore.lore as lore_module
    import mergekit_lore.registration  # noqa: F401  (registers ``lore``)

    torch.set_num_threads(args.threads)
    solves = []
    solve = lore_module.solve_lore

    def timed(*a, **k):
        began = time.perf_counter()
        solution = solve(*a, **k)
        solves.append((time.perf_counter() - began, solution.iterations))
        return solution

    lore_module.solve_lore = timed
    with open(args.config) as handle:
        config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        run_merge(config, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True))
        total = time.perf_counter() - began
    steps = [s for _, s in solves] or [0]
    print(f"{lore_module.__file__}: run_merge {total:.1f} s, solve_lore {sum(t for t, _ in solves):.1f} s, "
          f"outer steps mean {sum(steps) / len(steps):.1f} max {max(steps)} over {len(solves)} matrices")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
