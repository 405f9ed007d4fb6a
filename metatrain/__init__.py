"""metatrain: meta-training learned optimizers with pathwise, ES, PES and merged estimators.

References:
  Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
  optimizers", ICML. arXiv:1810.10180.
  Vicol, Metz, Sohl-Dickstein 2021, "Unbiased gradient estimation in unrolled computation
  graphs with persistent evolution strategies", ICML. arXiv:2112.13835.
"""
