"""Reading what a run did: static geometry, dynamics from recordings, trajectories, the meaning probe, generation, the
reports ``wakelab analyze`` writes and the evaluation ``wakelab evaluate`` makes. App layer."""
