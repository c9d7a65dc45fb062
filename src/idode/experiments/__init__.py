"""Studies that write reports, built on the library (which never imports from here).

- ``idode.experiments.demo``: ``idode demo``, the whole method on scikit-learn's digits.
- ``idode.experiments.ablate``: ``idode ablate``, the paper's claims tested at CPU scale.
- ``idode.experiments.figures``: the plots those reports share.
"""
