"""Operations endpoints of every long-running Pleura process: ``/healthz`` (alive), ``/readyz``
(its dependencies answer) and ``/metrics`` (Prometheus)."""
