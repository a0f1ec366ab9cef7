"""What the layers above agree on: the model contract and the names of the Celery tasks and queues."""
