"""The contracts between stages: the model contract (bundles, preprocessing, networks, the decision
rule, the active bundle) shared by training and inference, and the messages and task names shared
by the node and the worker."""
