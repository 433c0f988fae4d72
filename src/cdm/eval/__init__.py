"""Everything that judges a cascade's samples, one job per module:

- :mod:`~cdm.eval.reference`: which real images (the one loader of real images for evaluation);
- :mod:`~cdm.eval.features`: feature extractors (domain classifier, FID Inception) and cached
  reference statistics;
- :mod:`~cdm.eval.classifier`: the domain classifier and the Classification Accuracy Score;
- :mod:`~cdm.eval.scores`: FID, KID, IS, precision/recall of features against a reference, with SEs;
- :mod:`~cdm.eval.quality`: sample quality of a cascade (``cdm eval``) and :class:`EvalConfig`;
- :mod:`~cdm.eval.stages`: per-stage checks of SR stages;
- :mod:`~cdm.eval.floor`: the real-vs-real floor and the small-reference warning;
- :mod:`~cdm.eval.verdict`: the one rule for "better" (beyond twice the SE of the difference);
- :mod:`~cdm.eval.compare`: two cascades judged on the same seeds and reference (``cdm eval --compare``);
- :mod:`~cdm.eval.sweep`: the augmentation-level search engine; :mod:`~cdm.eval.search`: ``cdm sweep``
  (the engine with error bars, the decision and the report);
- :mod:`~cdm.eval.likelihood`: the cascade's likelihood bound (``cdm nll``);
- :mod:`~cdm.eval.ledger`: resumable results rows, shared with the experiments;
- :mod:`~cdm.eval.report`: HTML and Markdown reports.

The pure metrics (FID, KID, IS, precision/recall, PSNR) live one floor down, in :mod:`cdm.metrics`.
"""

from .features import make_extractor, reference_features
from .likelihood import NllConfig, evaluate_nll
from .quality import EvalConfig, evaluate_cascade
from .scores import quality_scores
from .reference import ReferenceSet, ReferenceSpec, load_reference
from .search import sweep_cascade
from .sweep import SweepConfig

__all__ = ["EvalConfig", "evaluate_cascade", "quality_scores", "make_extractor", "reference_features",
           "ReferenceSpec", "ReferenceSet", "load_reference", "SweepConfig", "sweep_cascade", "NllConfig",
           "evaluate_nll"]
