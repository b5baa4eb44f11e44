"""``wakelab evaluate``: what the trained model does with its new words, base against trained: reproducible sampling,
stylometry and loss by token class."""
