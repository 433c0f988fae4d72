"""The scorer of every point: FID (with a bootstrap standard error) and KID in the domain
classifier's feature space, and FID in the FID-Inception space on the first samples."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cdm.data import to_uint8
from cdm.eval.features import ReferenceFeatures
from cdm.eval.quality import quality_scores
from cdm.metrics import fid_bootstrap_se

PRIMARY = "fid"  # classifier-space FID ranks the levels


@dataclass
class PointScorer:
    """``scorer(images [N, C, 32, 32] in [-1, 1], labels [N]) -> metrics``: ``fid``, ``fid_se``,
    ``kid``, ``kid_std`` (classifier space, against ``ref``) and, with an Inception extractor,
    ``inception_fid`` of the first ``n_incep`` samples against ``incep_ref``."""

    classifier: object  # cdm.eval.features.ClassifierFeatures
    ref: ReferenceFeatures
    bootstrap: int
    inception: object | None = None  # cdm.eval.features.InceptionFID
    incep_ref: ReferenceFeatures | None = None
    n_incep: int = 0
    seed: int = 0

    def __call__(self, images: Tensor, labels: Tensor, inception: bool = True) -> dict:
        x = to_uint8(images)
        feats = self.classifier(x)
        q = quality_scores(feats, self.ref, metrics=("fid", "kid"))
        out = {"fid": q["fid"], "fid_se": fid_bootstrap_se(feats["features"], self.ref.mu, self.ref.sigma,
                                                             self.bootstrap, self.seed),
               "kid": q["kid"], "kid_std": q["kid_std"], "n_ref": q["n_real"]}
        if inception and self.inception is not None and self.n_incep > 0:
            m = min(self.n_incep, len(x))
            out["inception_fid"] = quality_scores(self.inception(x[:m]), self.incep_ref, metrics=("fid",))["fid"]
            out["n_incep"], out["n_incep_ref"] = m, len(self.incep_ref.features)
        return out

    def inception_fid(self, images: Tensor) -> float:
        """FID in Inception space of all ``images`` against ``incep_ref``."""
        return quality_scores(self.inception(to_uint8(images)), self.incep_ref, metrics=("fid",))["fid"]

    def for_row(self, row: str, rows: tuple[str, ...] | None):
        """This scorer, or one without the Inception FID for rows outside ``rows`` (None: all)."""
        if rows is None or row in rows:
            return self
        return lambda images, labels: self(images, labels, inception=False)
