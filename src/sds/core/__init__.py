"""Foundation: errors, patterns, config (validation, the per-stage key table), the results layout, runtime set-up."""
