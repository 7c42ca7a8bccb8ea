"""Command-line verbs that live in their own package (`memtrain edit`)."""
