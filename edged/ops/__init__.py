"""Operations: benchmarks, service management."""
