"""Planning: normalise, diff, order, place on GPUs. Pure: (desired, observed) -> Plan; no backend, no I/O."""
