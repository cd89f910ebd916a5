"""Detection quality: NAB corpus, NAB's scoring method, and offline replay of detector kinds."""
