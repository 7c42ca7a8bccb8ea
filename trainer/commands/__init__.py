"""CLI verbs and their option groups (each module exposes `add_parser(sub)` or argument helpers)."""
