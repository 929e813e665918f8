"""Will it fit: the memory estimate of a recipe before anything loads (a meta-device profile plus
analytic terms), suggestions that make it fit, the machine's own figures, and the printed report.

The modules, lowest first: ``units`` (sizes in bytes), ``result`` (``Estimate``, ``Suggestion``),
``config`` (the model's config), ``profile`` (what a meta forward pass saw), ``inputs`` (the
batches it is fed), ``terms`` (the analytic terms and the order of the peak), ``meta_kernels``
(stand-ins for kernels meta tensors cannot run), ``prepare`` (the meta model with its
strategies), ``meta_pass`` (the forward pass that fills a profile), ``machine`` (matmul rate,
process baseline, free memory), ``estimator`` (``Estimator``), ``suggest`` (making it fit) and
``render`` (the texts a person reads).
"""
