"""What the layers above agree on: the model contract, and the messages and task names between the
node and the worker.

The model contract is what training and inference share, and nothing else: bundle manifests and
their loading (:mod:`contract.bundle`), the one preprocessing (:mod:`contract.preprocess`,
:mod:`contract.ct_preprocess`), network construction and weight loading (:mod:`contract.networks`),
the decision rule (:mod:`contract.decision`) and which bundle is active for a kind
(:mod:`contract.active`). Between the node and the worker: the analysis summary and the instance
references a task carries (:mod:`contract.messages`), the task and queue names
(:mod:`contract.tasks`), the Celery app both build (:mod:`contract.celery_app`) and what marks a
DICOM object as Pleura's own result (:mod:`contract.marks`). It imports ``config`` and third-party libraries only: the worker reads it
and never imports training; training builds bundles through it.
"""
