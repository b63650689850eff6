"""Meta Neural Trojan Detection (Xu et al., IEEE S&P 2021): shadow models from the jumbo distribution trained
as Ray tasks (:mod:`.shadows`), the query-tuned meta-classifier and its artefact (:mod:`.meta`), and the
``mntd train`` and ``scan --method mntd`` jobs (:mod:`.job`)."""
