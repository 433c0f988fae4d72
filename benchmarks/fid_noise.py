"""How noisy is a FID at n samples, and where is its floor? Real images vs the cached reference.

Scores K disjoint sets of n real *train* images against the reference statistics of the test
split (the same reference `cdm eval` and `cdm sweep` use) in a feature space, and prints the mean
and standard deviation: the mean is the floor a perfect generator would reach at that n, the
standard deviation the noise between two evaluations.

    .venv/bin/python benchmarks/fid_noise.py --classifier runs/classifier --n 500 --sets 8 --resolution 32
"""

from __future__ import annotations

import argparse
import json
import statistics

from cdm.data import DataConfig
from cdm.eval.features import make_extractor, reference_features
from cdm.eval.quality import quality_scores
from cdm.eval.reference import ReferenceSpec, load_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--classifier", required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sets", type=int, default=8)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--n-ref", type=int, default=10000)
    p.add_argument("--out", default="")
    a = p.parse_args()
    data = DataConfig()
    ex = make_extractor("classifier", a.classifier)
    ref = reference_features(ex, load_reference(data, ReferenceSpec(split="test", n=a.n_ref)), a.resolution)
    src = ref.source
    # n * sets train images, a seeded class-stratified subset in random order: consecutive slices of it
    # are the disjoint sets.
    train = load_reference(data, ReferenceSpec(split="train", n=a.n * a.sets)).at(a.resolution)
    fids, kids = [], []
    for k in range(a.sets):
        s = quality_scores(ex(train[k * a.n:(k + 1) * a.n]), ref, metrics=("fid", "kid"))
        fids.append(s["fid"])
        kids.append(s["kid"])
    out = {"feature_space": ex.name, "reference": src, "n": a.n, "sets": a.sets,
           "fid_mean": statistics.mean(fids), "fid_std": statistics.stdev(fids), "fids": fids,
           "kid_mean": statistics.mean(kids), "kid_std": statistics.stdev(kids)}
    print(json.dumps({k: v for k, v in out.items() if k != "fids"}, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
