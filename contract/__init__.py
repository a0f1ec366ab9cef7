"""The model contract: what training and inference share, and nothing else.

Bundle manifests and their loading (:mod:`contract.bundle`), the one preprocessing
(:mod:`contract.preprocess`, :mod:`contract.ct_preprocess`), network construction and weight loading
(:mod:`contract.networks`), the decision rule (:mod:`contract.decision`) and which bundle is active
for a kind (:mod:`contract.active`). It imports ``config`` and third-party libraries only: the worker
reads it and never imports training; training builds bundles through it.
"""
