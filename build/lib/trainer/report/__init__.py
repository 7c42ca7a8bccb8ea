"""Reports: `memtrain evaluate` (sections -> dict), every Markdown rendering, and the figures."""
