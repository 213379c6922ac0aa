"""Engine: one pass (observe, plan, apply, verify, rollback, journal)."""
