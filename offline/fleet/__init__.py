"""Work that outgrows one process, on Ray (the optional extra ``fleet``): the fleet scan of a model registry
(:mod:`.scan`) and the shadow models of Meta Neural Trojan Detection (:mod:`offline.mntd`)."""
