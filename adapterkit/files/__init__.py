"""File-system primitives shared by the store and the merge: atomic publication, fsync, sequential writes."""
