"""Training data: records read and checked, tokenised once into a cache, sharded and collated."""
