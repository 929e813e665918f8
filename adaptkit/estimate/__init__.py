"""Will it fit: the memory estimate of a recipe before anything loads (a meta-device profile plus
analytic terms), suggestions that make it fit, the machine's own figures, and the printed report."""
