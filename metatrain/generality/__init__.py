"""The generality suite: the bundled optimizer on models users write, against tuned Adam.

``models`` holds the Flax modules, ``protocol`` the training runs and their cache, and
``suite`` the summary, tables and plots (``python -m metatrain.generality``).
"""
