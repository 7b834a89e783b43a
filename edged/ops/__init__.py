"""Operations: service management, the thermal and memory governor."""
