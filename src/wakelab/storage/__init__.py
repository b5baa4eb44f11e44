"""Files that are complete or absent: checkpoints (publish by rename, manifests, crash points), write points (a full
disk as one line) and recordings. Storage layer: imports only the core."""
