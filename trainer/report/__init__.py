"""Reports: `memtrain evaluate` (sections -> dict), the Markdown of the production verbs, the edit comparison."""
