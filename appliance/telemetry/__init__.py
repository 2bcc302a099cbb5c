"""Operations: structured logs, Prometheus metrics, systemd notify."""
