"""What the layers above agree on: the model contract and the names of the Celery tasks and queues.

The model contract is what training and inference share, and nothing else: bundle manifests and
their loading (:mod:`contract.bundle`), the one preprocessing (:mod:`contract.preprocess`,
:mod:`contract.ct_preprocess`), network construction and weight loading (:mod:`contract.networks`),
the decision rule (:mod:`contract.decision`) and which bundle is active for a kind
(:mod:`contract.active`). The task and queue names are :mod:`contract.tasks`. It imports ``config``
and third-party libraries only: the worker reads it and never imports training; training builds
bundles through it.
"""
