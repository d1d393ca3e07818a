"""Training: objective, balance (aux-free bias update), optimiser and schedules (shared/DESIGN.md)."""
