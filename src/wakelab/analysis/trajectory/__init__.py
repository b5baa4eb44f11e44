"""The new tokens moving among the base tokens: the fixed projections, the frames, meaning words, the HTML page and
still pictures, the per-token table, live (the trajectory plugin) or from a recording."""
