"""The Fashion-MNIST subset used by the trainer when no data set is given (see README.md here)."""
