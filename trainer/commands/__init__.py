"""`memtrain` verbs, one module each (`add_parser(sub)` + a run function returning an exit code)."""
