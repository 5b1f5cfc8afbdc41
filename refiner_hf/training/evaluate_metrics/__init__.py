"""`evaluate` metric modules shipped with the package, loaded by path (`evaluate.load(path)`), offline."""
