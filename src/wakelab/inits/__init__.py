"""The math the built-in inits share: Gaussian rows fitted to the base rows, a new word's base sub-tokens, and the
aliasing distance (the model reading a new token against the word spelled out) distill minimises. Core layer; the public
API re-exports it for plugins."""
