"""Small shared helpers: paths, atomic file writes, seeding, device choice."""
