"""Operations: Prometheus metrics, the /metrics /healthz /readyz endpoint, liveness and
readiness, log setup. Imports nothing of linewatch's (rank 1, beside bus and scoring).
"""
