"""The Fashion-MNIST reproduction of the paper's conditioning-augmentation findings.

Driven by ``experiments/fmnist_repro.py``; this package holds the experiment's own pieces (its
profiles, its rows, the scorer, the run and the report), built on the ``cdm`` library.
"""
